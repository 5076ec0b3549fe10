"""Synthetic captions (VeCap-style recaptioning): an open_clip CoCa model writes a caption for each kept image."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from mm1data.config import check, check_pool
from mm1data.scorers.clip import ImagePreprocessor, load_clip
from mm1data.stage import Batch

log = logging.getLogger(__name__)
CONTEXT = 76  # CoCa's text context (coca_ViT-B-32, coca_ViT-L-14): the longest caption in tokens, start/end included


@dataclass(frozen=True)
class RecaptionConfig:
    enabled: bool = False  # true: every kept row gets syn_caption, written as KEY.syn.txt beside the alt-text KEY.txt
    model: str = "coca_ViT-B-32"  # an open_clip CoCa model (coca_ViT-B-32, coca_ViT-L-14), or mm1data-tiny-coca
    pretrained: str | None = "mscoco_finetuned_laion2b_s13b_b90k"  # open_clip tag, local path, s3:// URI, or null
    model_config: str | None = None  # path to an extra open_clip model config JSON (custom architectures)
    batch_size: int = 64  # rows per generation call
    # captioning actors: N (at least N; on GPUs up to one per GPU the cluster can reach) or [min, max] (CPU too)
    workers: int | tuple[int, ...] = 1
    num_gpus: float | None = None  # per actor; None = 1 when the cluster has GPUs, else 0
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    device: str = "auto"  # auto (cuda when visible) | cpu | cuda
    max_tokens: int = 30  # tokens per caption, start and end included (open_clip's generate: seq_len=30)
    min_tokens: int = 5  # the end token is not allowed before this many (open_clip's min_seq_len=5)
    repetition_penalty: float = 1.0  # > 1 makes a token already in the caption less likely (CTRL's rule); 1 = off

    def __post_init__(self) -> None:
        check(self, "batch_size", ge=1)
        check_pool(self, "workers")
        check(self, "num_gpus", ge=0, optional=True)
        check(self, "precision", choices=("auto", "fp32", "bf16", "fp16"))
        check(self, "device", choices=("auto", "cpu", "cuda"))
        check(self, "min_tokens", ge=1)
        check(self, "max_tokens", gt=self.min_tokens, le=CONTEXT)
        check(self, "repetition_penalty", gt=0)


def generate(model, pixels, sot: int, eot: int, max_tokens: int, min_tokens: int, repetition_penalty: float = 1.0):
    """Greedy CoCa decoding -> the generated token ids of each image (start and end tokens left out).

    Hand-written rather than open_clip's `CoCa.generate`, which imports transformers (a large dependency whose
    releases broke CoCa generation twice: 4.31 and 4.56) for its logits processors. This is the same loop as its
    `generation_type="top_k", top_k=1` path with the same min-length and repetition rules (tests/test_recaption.py
    compares them where transformers is installed), except that a finished caption leaves the batch instead of
    being fed pad tokens to the end, so the last long caption does not cost a full batch per step."""
    import torch

    n = len(pixels)
    latent, embs = model._encode_image(pixels)  # once; each step reruns only the text towers
    tokens = torch.full((n, 1), sot, dtype=torch.long, device=pixels.device)
    rows = torch.arange(n, device=pixels.device)  # the images still being captioned
    out: list[list[int]] = [[] for _ in range(n)]
    for length in range(1, max_tokens):  # tokens.shape[1] == length
        logits = model(None, tokens, image_latent=latent, image_embs=embs, output_labels=False)["logits"][:, -1]
        logits = logits.float()
        if repetition_penalty != 1.0:
            seen = logits.gather(1, tokens)
            logits.scatter_(1, tokens, torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty))
        if length < min_tokens:
            logits[:, eot] = -torch.inf
        nxt = logits.argmax(-1) if length < max_tokens - 1 else torch.full_like(rows, eot)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        done = nxt == eot
        for i in done.nonzero().flatten().tolist():
            out[int(rows[i])] = tokens[i, 1:-1].tolist()
        if done.any():
            keep = ~done
            rows, tokens, latent, embs = rows[keep], tokens[keep], latent[keep], embs[keep]
            if not len(rows):
                break
    return out


class CocaCaptioner:
    """Adds syn_caption: a CoCa caption of each kept row's image; "" on rows already dropped (no model time on them)
    and on a row whose image does not decode (logged)."""

    def __init__(self, cfg: RecaptionConfig) -> None:
        import torch

        self.cfg = cfg
        self.device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, preprocess, self.tokenizer = load_clip(cfg, self.device, section="recaption", output="syn_caption")
        if not hasattr(self.model, "text_decoder"):
            raise ValueError(f"recaption.model {cfg.model!r} is not a CoCa model (it has no text decoder)")
        if not hasattr(self.tokenizer, "sot_token_id"):
            raise ValueError(f"recaption.model {cfg.model!r}: only CoCa models with open_clip's CLIP tokenizer")
        proj = getattr(self.model.text_decoder, "text_projection", None)
        if cfg.pretrained is None and proj is not None:
            # open_clip 3.3 leaves the decoder's output projection as torch.empty (its init_parameters, which would
            # set it, fails and is never called): whatever the allocator hands back (zeros, old data, NaN) would
            # decide the "random" captions. The std is the one that init_parameters means to use.
            torch.nn.init.normal_(proj.data, std=proj.shape[0] ** -0.5)
        prec = cfg.precision if cfg.precision != "auto" else ("bf16" if self.device == "cuda" else "fp32")
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]
        self.images = ImagePreprocessor(preprocess, self.model, self.device)
        self.special = {self.tokenizer.sot_token_id, self.tokenizer.eot_token_id}

    def generate(self, pixels) -> list[list[int]]:
        """Token ids of a pixel batch's captions (what the model does, without decoding images or text)."""
        import torch

        c = self.cfg
        with torch.inference_mode(), torch.autocast(self.device, dtype=self.dtype, enabled=self.dtype is not None):
            return generate(
                self.model, pixels, self.tokenizer.sot_token_id, self.tokenizer.eot_token_id, c.max_tokens,
                c.min_tokens, c.repetition_penalty,
            )  # fmt: skip

    def captions(self, images: list[bytes]) -> list[str]:
        pixels, ok = self.images(images, skip_bad=True)
        out = [""] * len(images)
        if pixels is not None:
            for i, ids in zip(ok.tolist(), self.generate(pixels)):
                out[i] = self.tokenizer.decode([t for t in ids if t not in self.special]).strip()
        return out

    def __call__(self, batch: Batch) -> Batch:
        kept = np.flatnonzero(batch["drop_reason"] == "")  # rows that survived every filter
        syn = np.full(len(batch["drop_reason"]), "", dtype=object)
        if len(kept):
            syn[kept] = self.captions([batch["image"][i] for i in kept])
        batch["syn_caption"] = syn
        return batch
