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
from mm1data.config import check, check_pool
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
    # scoring actors: N (at least N; on GPUs up to one per GPU the cluster can reach) or [min, max] (elastic, CPU too)
    workers: int | tuple[int, ...] = 1
    num_gpus: float | None = None  # per actor; None = 1 when the cluster has GPUs, else 0
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    device: str = "auto"  # auto (cuda when visible) | cpu | cuda

    def __post_init__(self) -> None:
        check(self, "batch_size", ge=1)
        check_pool(self, "workers")
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


DECODES = ("auto", "pil", "tensor")
DECODE_ERROR = "decode_error"  # drop reason of a kept row whose image no decoder reads (as the download stage's)


class ImagePreprocessor:
    """Image bytes -> a normalised pixel batch on the device, with open_clip's eval transform of `preprocess`.

    Two ways to the same pixels, chosen per image:
    - tensor (`decode="tensor"`; the default on CUDA): JPEGs whose header says RGB or grayscale are decoded in one
      call by torchvision's decode_jpeg on the device (nvJPEG on CUDA, batched; libjpeg-turbo on CPU), then each is
      resized and center-cropped on the device with torchvision.transforms.v2.functional as open_clip's Resize and
      CenterCrop do (shortest side to the model's size, antialiased bicubic or bilinear; or both sides, "squash").
      CPU decoding (~1,500 images/s on 16 threads) would starve a GPU that embeds several thousand pairs a second.
    - PIL (`decode="pil"`; the default on CPU, and on any device for other formats, CMYK JPEGs, JPEGs the device
      decoder refuses and preprocessings that are not Resize + CenterCrop + ToTensor + Normalize): open_clip's own
      PIL steps in threads (PIL releases the GIL), a reduced-size JPEG decode first (`draft`).
    Both end in one batched uint8 -> float, normalise (open_clip's mean and std) on the device. An image neither
    decodes is left out (skip_bad) or raises."""

    def __init__(self, preprocess, model, device: str, decode: str = "auto") -> None:
        import torch

        if decode not in DECODES:
            raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
        self.preprocess, self.device = preprocess, device
        size = getattr(model.visual, "image_size", 224)
        self.input_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.pool = ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1)))
        steps = list(getattr(preprocess, "transforms", []))
        names = [type(t).__name__ for t in steps]
        self.batched = len(steps) >= 2 and names[-1] == "Normalize" and names[-2] in ("ToTensor", "MaybeToTensor")
        self.geometry = None  # (resize size, interpolation, crop size): the tensor path's steps, when it has them
        if self.batched:
            from torchvision.transforms import Compose

            self.pil_steps = Compose(steps[:-2])
            self.mean = torch.tensor(steps[-1].mean, device=device).view(1, 3, 1, 1)
            self.std = torch.tensor(steps[-1].std, device=device).view(1, 3, 1, 1)
            self.geometry = _tensor_geometry(steps[:-2])
        if decode == "auto":
            decode = "tensor" if str(device).startswith("cuda") else "pil"
        self.decode = decode if self.geometry is not None else "pil"

    # ---- PIL
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

    # ---- tensor
    @staticmethod
    def _on_device(data: bytes) -> bool:
        """Whether the header says an 8-bit baseline, extended or progressive JPEG of 1 (gray) or 3 (YCbCr)
        components: what nvJPEG decodes. Hand-written marker walk: PIL's header parse costs ~30-60 us an image in
        Python, a third of a ViT-B-32 batch's GPU time at 256 images; this reads a few segment lengths."""
        if data[:2] != b"\xff\xd8":
            return False
        pos, n = 2, len(data)
        while pos + 4 <= n:
            if data[pos] != 0xFF:
                return False
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            if marker in (0xC0, 0xC1, 0xC2):  # SOF0-2: precision, height, width, components
                return pos + 10 <= n and data[pos + 4] == 8 and data[pos + 9] in (1, 3)
            if (0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xDA:
                return False  # lossless or arithmetic-coded, or scan data before any frame header
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        return False

    def _decode(self, images: list[bytes]) -> list:
        """JPEG bytes -> CHW uint8 tensors on the device (None where one fails), one batched call when all decode.
        torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec (a DeprecationWarning); they are
        what the pinned torch ships with, and TorchCodec would be a new dependency for the same nvJPEG call."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in images]
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
        except Exception:  # one bad image fails the whole call: find it image by image
            out = []
            for d in data:
                try:
                    out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=self.device))
                except Exception:
                    out.append(None)
            return out

    def _transform(self, img):
        from torchvision.transforms.v2 import functional as F

        size, interpolation, crop = self.geometry
        img = F.resize(img, size, interpolation=interpolation, antialias=True)
        return F.center_crop(img, crop) if crop else img

    # ---- both
    def __call__(self, images: list[bytes], skip_bad: bool = False):
        """-> (pixels of the images that decode, on the device; their indices in `images`). Without skip_bad, an
        image that does not decode raises."""
        import torch

        on_device: dict[int, Any] = {}  # image index -> CHW uint8 pixels on the device
        rest = list(range(len(images)))
        if self.decode == "tensor":
            jpeg = [i for i in rest if self._on_device(images[i])]
            by_shape: dict[tuple, list] = {}  # images of one size are resized in one call (fewer kernel launches)
            for i, img in zip(jpeg, self._decode([images[i] for i in jpeg])):
                if img is not None:
                    by_shape.setdefault(tuple(img.shape), []).append((i, img))
            for group in by_shape.values():
                resized = self._transform(torch.stack([img for _, img in group]))
                on_device.update((i, px) for (i, _), px in zip(group, resized))
            on_device = dict(sorted(on_device.items()))  # back in batch order (the groups interleave)
            rest = [i for i in rest if i not in on_device]  # other formats, CMYK, and what the device refused
        decoded = self.pool.map(self._try_pixels if skip_bad else self._pixels, [images[i] for i in rest])
        on_cpu = {i: p for i, p in zip(rest, decoded) if p is not None}
        ok = np.array(sorted([*on_device, *on_cpu]), dtype=np.int64)
        if not len(ok):
            return None, ok
        if not self.batched:
            return torch.stack([on_cpu[i] for i in ok]).to(self.device), ok
        parts = []  # (slots in the batch, CHW uint8 pixels on the device)
        if on_cpu:  # one host -> device copy for the PIL-decoded images (HWC -> CHW)
            pil = torch.from_numpy(np.stack(list(on_cpu.values()))).to(self.device).permute(0, 3, 1, 2)
            parts.append((list(on_cpu), pil))
        if on_device:
            parts.append((list(on_device), torch.stack(list(on_device.values()))))
        if len(parts) == 1:
            x = parts[0][1]  # ok is sorted, and so are both parts' keys
        else:
            x = torch.empty((len(ok), *parts[0][1].shape[1:]), dtype=torch.uint8, device=self.device)
            slot = {int(i): k for k, i in enumerate(ok)}
            for idx, px in parts:
                x[torch.tensor([slot[i] for i in idx], device=self.device)] = px
        return (x.float().div_(255) - self.mean) / self.std, ok


def _tensor_geometry(steps: list) -> tuple | None:
    """(resize size, interpolation, crop size or None) that reproduce open_clip's PIL eval steps on tensors, or None
    when they are not a Resize (bicubic or bilinear) and an optional CenterCrop (plus MaybeConvertMode)."""
    from torchvision.transforms import InterpolationMode

    steps = [t for t in steps if type(t).__name__ != "MaybeConvertMode"]  # RGB already: both paths convert first
    names = [type(t).__name__ for t in steps]
    if names not in (["Resize", "CenterCrop"], ["Resize"]):
        return None
    resize = steps[0]
    if resize.interpolation not in (InterpolationMode.BICUBIC, InterpolationMode.BILINEAR) or resize.max_size:
        return None
    size = [resize.size] if isinstance(resize.size, int) else list(resize.size)  # [s]: the shorter side to s
    crop = list(steps[1].size) if len(names) == 2 else None
    return size, resize.interpolation, crop


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
        """Unit-norm image embeddings (float32, on the device), one per encoded image; an image that does not
        decode raises."""
        pixels, _ = self.images(images)
        return self._encode(pixels)

    def embed_decodable(self, images: list[bytes]) -> tuple[Any, np.ndarray]:
        """(embeddings of the images that decode, or None when none does; their indices in `images`)."""
        pixels, ok = self.images(images, skip_bad=True)
        return (self._encode(pixels) if len(ok) else None), ok

    def _encode(self, pixels):
        import torch

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
            emb, ok = self.embed_decodable([batch["image"][i] for i in kept])
            if len(ok):
                texts = self.embed_texts([str(batch["caption"][i]) for i in kept[ok]])
                scores[kept[ok]] = (emb * texts).sum(-1).cpu().numpy()
            bad = np.zeros(len(scores), dtype=bool)
            bad[kept] = True
            bad[kept[ok]] = False  # a kept image that no decoder reads is the row's failure, not the job's
            batch["drop_reason"] = np.where(bad, DECODE_ERROR, batch["drop_reason"]).astype(object)
        batch["clip_score"] = scores
        return batch
