"""open_clip image-caption scoring on an actor pool (the model loads once per actor, on GPU when present)."""

from __future__ import annotations

import io
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from mm1data import storage
from mm1data.config import check
from mm1data.stage import Batch

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
    device: str = "auto"  # auto (cuda when visible) | cpu | cuda

    def __post_init__(self) -> None:
        check(self, "batch_size", ge=1)
        check(self, "workers", ge=1)
        check(self, "num_gpus", ge=0, optional=True)
        check(self, "precision", choices=("auto", "fp32", "bf16", "fp16"))


def open_clip_weights(cfg: Any, null_warning: str) -> str | None:
    """Registers mm1data's model configs (and cfg.model_config) with open_clip; -> what to pass as `pretrained`:
    an open_clip tag or local path as given, an s3:// URI copied to a local file, or None with `null_warning`
    warned and logged (random weights). `cfg` needs model_config and pretrained."""
    import open_clip

    open_clip.add_model_config(MODEL_CONFIGS)
    if cfg.model_config:
        open_clip.add_model_config(storage.local_copy(cfg.model_config))
    if cfg.pretrained is None:
        warnings.warn(null_warning, stacklevel=3)
        log.warning(null_warning)
        return None
    return storage.local_copy(cfg.pretrained) if storage.is_s3(cfg.pretrained) else cfg.pretrained


def load_clip(cfg: ClipConfig, device: str = "cpu", section: str = "clip", output: str = "clip_score"):
    """-> (model, preprocess, tokenizer) with weights from a tag, a local path or s3://; null = random + a warning
    naming the config `section` and the `output` it makes meaningless. `cfg` needs model, pretrained, model_config."""
    import open_clip

    pretrained = open_clip_weights(
        cfg, f"{section}.pretrained is null: {cfg.model} has random weights, so {output} is meaningless"
    )
    model, _, preprocess = open_clip.create_model_and_transforms(cfg.model, pretrained=pretrained, device=device)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(cfg.model)


class ImagePreprocessor:
    """Image bytes -> a normalised pixel batch on the device, with open_clip's eval transform of `preprocess`.

    Decode + resize is CPU work that starves a GPU from one thread. PIL releases the GIL, torch's per-image
    ToTensor/Normalize do not: open_clip's PIL steps run in threads, then the whole batch is converted and normalised
    at once on the device (same mean/std as open_clip's transform)."""

    def __init__(self, preprocess, model, device: str) -> None:
        import torch

        self.preprocess, self.device = preprocess, device
        size = getattr(model.visual, "image_size", 224)
        self.input_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.pool = ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1)))
        steps = list(getattr(preprocess, "transforms", []))
        names = [type(t).__name__ for t in steps]
        self.batched = len(steps) >= 2 and names[-1] == "Normalize" and names[-2] in ("ToTensor", "MaybeToTensor")
        if self.batched:
            from torchvision.transforms import Compose

            self.pil_steps = Compose(steps[:-2])
            self.mean = torch.tensor(steps[-1].mean, device=device).view(1, 3, 1, 1)
            self.std = torch.tensor(steps[-1].std, device=device).view(1, 3, 1, 1)

    def _pixels(self, data: bytes):
        from PIL import Image

        im = Image.open(io.BytesIO(data))
        im.draft("RGB", self.input_size)  # JPEG: decode at the smallest DCT scale still >= the model's input
        im = im.convert("RGB")
        return np.asarray(self.pil_steps(im)) if self.batched else self.preprocess(im)

    def _try_pixels(self, data: bytes):
        try:
            return self._pixels(data)
        except Exception as e:  # a row's bad image is data: the caller leaves that row out
            log.warning("image does not decode (%s: %s)", type(e).__name__, e)
            return None

    def __call__(self, images: list[bytes], skip_bad: bool = False):
        """-> (pixels of the images that decode, on the device; their indices in `images`). Without skip_bad, an
        image that does not decode raises."""
        import torch

        pixels = list(self.pool.map(self._try_pixels if skip_bad else self._pixels, images))
        ok = np.array([i for i, p in enumerate(pixels) if p is not None], dtype=np.int64)
        pixels = [pixels[i] for i in ok]
        if not pixels:
            return None, ok
        if self.batched:
            x = torch.from_numpy(np.stack(pixels)).to(self.device).permute(0, 3, 1, 2).float().div_(255)
            return (x - self.mean) / self.std, ok
        return torch.stack(pixels).to(self.device), ok


class ClipScorer:
    """Adds clip_score = cosine(image embedding, caption embedding) on kept rows; NaN on rows already dropped."""

    SECTION, OUTPUT = "clip", "clip_score"  # the run config section and the score, named in the null-weights warning

    def __init__(self, cfg: ClipConfig) -> None:
        import torch

        self.device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.preprocess, self.tokenizer = load_clip(cfg, self.device, self.SECTION, self.OUTPUT)
        prec = cfg.precision if cfg.precision != "auto" else ("bf16" if self.device == "cuda" else "fp32")
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]
        self.images = ImagePreprocessor(self.preprocess, self.model, self.device)

    def embed_images(self, images: list[bytes]):
        """Unit-norm image embeddings (float32, on the device), one per encoded image."""
        import torch

        pixels, _ = self.images(images)
        with torch.inference_mode(), torch.autocast(self.device, dtype=self.dtype, enabled=self.dtype is not None):
            return self.model.encode_image(pixels, normalize=True).float()

    def embed_texts(self, texts: list[str]):
        """Unit-norm text embeddings (float32, on the device); a text past the context length is truncated."""
        import torch

        tokens = self.tokenizer(texts)
        with torch.inference_mode(), torch.autocast(self.device, dtype=self.dtype, enabled=self.dtype is not None):
            return self.model.encode_text(tokens.to(self.device), normalize=True).float()

    def similarity(self, images: list[bytes], captions: list[str]) -> np.ndarray:
        return (self.embed_images(images) * self.embed_texts(captions)).sum(-1).cpu().numpy()

    def __call__(self, batch: Batch) -> Batch:
        kept = np.flatnonzero(batch["drop_reason"] == "")  # no model time on rejected rows
        scores = np.full(len(batch["drop_reason"]), np.nan, dtype=np.float32)
        if len(kept):
            scores[kept] = self.similarity([batch["image"][i] for i in kept], [str(batch["caption"][i]) for i in kept])
        batch["clip_score"] = scores
        return batch
