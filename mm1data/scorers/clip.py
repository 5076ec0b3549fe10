"""open_clip image-caption scoring on an actor pool (the model loads once per actor, on GPU when present)."""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from mm1data import storage
from mm1data.stage import Batch, Resources

log = logging.getLogger(__name__)
MODEL_CONFIGS = os.path.join(os.path.dirname(__file__), "model_configs")  # mm1data-tiny-clip: tests and demo


@dataclass(frozen=True)
class ClipConfig:
    enabled: bool = True
    model: str = "ViT-B-32"  # any open_clip model name (open_clip.list_models()), or mm1data-tiny-clip
    pretrained: str | None = "openai"  # open_clip tag, local checkpoint path, s3:// URI, or null (random weights)
    model_config: str | None = None  # path to an extra open_clip model config JSON (custom architectures)
    batch_size: int = 256  # rows per scoring call
    workers: int = 1  # scoring actors
    num_gpus: float | None = None  # per actor; None = 1 when the cluster has GPUs, else 0
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16 | fp16


def load_clip(cfg: ClipConfig, device: str = "cpu"):
    """-> (model, preprocess, tokenizer) with weights from a tag, a local path or s3://; null = random + warning."""
    import open_clip

    open_clip.add_model_config(MODEL_CONFIGS)
    if cfg.model_config:
        open_clip.add_model_config(storage.local_copy(cfg.model_config))
    pretrained = cfg.pretrained
    if pretrained is None:
        msg = f"clip.pretrained is null: {cfg.model} has random weights, so clip_score is meaningless"
        warnings.warn(msg, stacklevel=2)
        log.warning(msg)
    elif storage.is_s3(pretrained):
        pretrained = storage.local_copy(pretrained)
    model, _, preprocess = open_clip.create_model_and_transforms(cfg.model, pretrained=pretrained, device=device)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(cfg.model)


class ClipScorer:
    """Adds clip_score = cosine(image embedding, caption embedding) on kept rows; NaN on rows already dropped."""

    resources: ClassVar[Resources] = Resources(num_cpus=1.0, batch_size=256)

    def __init__(self, cfg: ClipConfig) -> None:
        import torch

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.preprocess, self.tokenizer = load_clip(cfg, self.device)
        prec = cfg.precision if cfg.precision != "auto" else ("bf16" if self.device == "cuda" else "fp32")
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]

    def similarity(self, images: list[bytes], captions: list[str]) -> np.ndarray:
        import torch
        from PIL import Image

        pixels = torch.stack([self.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
        tokens = self.tokenizer(captions)
        with torch.inference_mode(), torch.autocast(self.device, dtype=self.dtype, enabled=self.dtype is not None):
            img = self.model.encode_image(pixels.to(self.device), normalize=True)
            txt = self.model.encode_text(tokens.to(self.device), normalize=True)
        return (img.float() * txt.float()).sum(-1).cpu().numpy()

    def __call__(self, batch: Batch) -> Batch:
        kept = np.flatnonzero(batch["drop_reason"] == "")  # no model time on rejected rows
        scores = np.full(len(batch["drop_reason"]), np.nan, dtype=np.float32)
        if len(kept):
            scores[kept] = self.similarity([batch["image"][i] for i in kept], [str(batch["caption"][i]) for i in kept])
        batch["clip_score"] = scores
        return batch
