"""The CLIP stage against the bare model forward on the same device, weights, pairs and batches (issue 15: the whole
stage at >= 0.8x the bare forward on a GPU). Three runs over the same batches (after a warm-up batch each), batch by
batch in turn:

- bare: encode_image + encode_text + cosine, on pixel tensors and tokens already on the device (nothing else);
- stage, CPU decode: ClipScorer on rows of JPEG bytes and captions, images decoded and resized by PIL in threads
  (`decode="pil"`, the CPU default), then copied to the device;
- stage, device decode: the same stage with `decode="tensor"` (the CUDA default: nvJPEG through torchvision's
  batched decode_jpeg, resize and crop on the device; on CPU the same code with libjpeg-turbo).

Prints pairs/s, each stage's ratio to the bare forward, the agreement of the two decodes' scores, the driver's peak
RSS and the device memory each run adds at its peak, and (unless --no-ray) the stage on a Ray Data actor pool, as the
pipeline runs it, with the worker's peak RSS. Weights are random (`pretrained: null`): speed does not depend on them.

    python bench/gpu_clip.py [--model ViT-B-32] [--n 4096] [--batch 256] [--size 512] [--no-ray]

Without CUDA it runs on CPU in fp32 (default n=256, batch 64) to check that it works; those figures are CPU ones.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_pairs(n: int, size: int) -> tuple[list[bytes], list[str]]:
    """n photo-like JPEGs at the download stage's default keep_ratio size (the shorter side `size`, 4:3), 64
    distinct ones cycled (decoding is timed, making them is not), and a caption each."""
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = size * 4 // 3, size
    yy, xx = np.mgrid[0:h, 0:w]
    imgs = []
    for i in range(min(n, 64)):
        arr = np.stack([xx * 255 // w, yy * 255 // h, (xx * (i + 1) + yy) % 256], -1).astype(np.float32)
        arr = np.clip(arr + rng.normal(0, 12, arr.shape), 0, 255).astype(np.uint8)  # smooth + noise: photo-sized
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=90)
        imgs.append(buf.getvalue())
    return [imgs[i % len(imgs)] for i in range(n)], [f"a photo of thing number {i}" for i in range(n)]


def rows(images: list[bytes], captions: list[str]) -> dict[str, np.ndarray]:
    def obj(values: list) -> np.ndarray:
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out

    return {"image": obj(images), "caption": obj(captions), "drop_reason": obj([""] * len(images))}


def peak_device_mib(device: str) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")


def on_ray(cfg, images: list[bytes], captions: list[str], batch: int, gpu: bool) -> None:
    """The stage as the pipeline runs it: one actor of a Ray Data actor pool (a GPU when there is one)."""
    from common import on_one_actor

    from mm1data.scorers.clip import ClipScorer

    rows = [{"image": im, "caption": c, "drop_reason": ""} for im, c in zip(images, captions)]
    on_one_actor(ClipScorer, cfg, rows, "clip_score", batch, "pairs", num_gpus=1 if gpu else 0)


def main() -> None:
    import torch

    from mm1data.scorers.clip import ClipConfig, ClipScorer, ImagePreprocessor

    sys.stdout.reconfigure(line_buffering=True)
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--n", type=int, default=4096 if cuda else 256)
    p.add_argument("--batch", type=int, default=256 if cuda else 64)
    p.add_argument("--size", type=int, default=512, help="shorter side of the JPEGs (download.image_size)")
    p.add_argument("--no-ray", action="store_true")
    a = p.parse_args()
    images, captions = make_pairs(a.n, a.size)
    cfg = ClipConfig(model=a.model, pretrained=None, batch_size=a.batch)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: said in the docstring
        scorer = ClipScorer(cfg)
    dev = scorer.device
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name(0) if dev == "cuda" else f"CPU ({len(os.sched_getaffinity(0))} cores)"
    prec = "fp32" if scorer.dtype is None else str(scorer.dtype).removeprefix("torch.")
    print(f"{name}, torch {torch.__version__}, {a.model} {prec} (random weights), {a.n} pairs in batches of "
          f"{a.batch}, JPEGs {a.size * 4 // 3}x{a.size} ({np.mean([len(b) for b in images[:64]]) / 1024:.0f} KB), "
          f"PIL decode threads {scorer.images.pool._max_workers}")  # fmt: skip
    preps = {
        "CPU decode": ImagePreprocessor(scorer.preprocess, scorer.model, dev, decode="pil"),
        "device decode": ImagePreprocessor(scorer.preprocess, scorer.model, dev, decode="tensor"),
    }
    batches = [(images[i : i + a.batch], captions[i : i + a.batch]) for i in range(0, a.n, a.batch)]

    # bare forward: its inputs are made (and moved to the device) before the clock starts
    ready = [(preps["device decode"](im)[0], scorer.tokenizer(c).to(dev)) for im, c in batches]

    def bare(b):
        px, tok = b
        with torch.inference_mode(), torch.autocast(dev, dtype=scorer.dtype, enabled=scorer.dtype is not None):
            img = scorer.model.encode_image(px, normalize=True).float()
            txt = scorer.model.encode_text(tok, normalize=True).float()
        return (img * txt).sum(-1).cpu().numpy()

    def stage(prep):
        def run(b):
            scorer.images = prep
            return scorer(rows(*b))["clip_score"]

        return run

    runs = {"bare forward": (bare, ready)}
    runs.update({f"stage, {label}": (stage(prep), batches) for label, prep in preps.items()})
    secs, peak, scores = dict.fromkeys(runs, 0.0), dict.fromkeys(runs, 0.0), {r: [] for r in runs}
    for fn, inputs in runs.values():  # warm-up: cudnn autotune, the allocator, the decode threads
        fn(inputs[0])
    for j in range(len(batches)):  # batch by batch, the three in turn: a shared machine's load hits all alike
        for r in list(runs)[j % 3 :] + list(runs)[: j % 3]:
            fn, inputs = runs[r]
            held = torch.cuda.memory_allocated() if dev == "cuda" else 0  # the inputs made beforehand, the model
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync()
            t0 = time.perf_counter()
            scores[r].append(fn(inputs[j]))
            sync()
            secs[r] += time.perf_counter() - t0
            peak[r] = max(peak[r], peak_device_mib(dev) - held / 2**20)
    base = a.n / secs["bare forward"]
    for r in runs:
        ratio = "" if r == "bare forward" else f", {a.n / secs[r] / base:.2f}x the bare forward (goal >= 0.8x)"
        print(f"{r}: {a.n / secs[r]:,.0f} pairs/s{ratio}; device memory it adds at its peak {peak[r]:,.0f} MiB")
    del ready, runs
    scores = {r: np.concatenate(v) for r, v in scores.items()}
    t0 = time.perf_counter()
    preps["CPU decode"](images[: a.batch])
    print(f"  CPU decode + resize alone: {a.batch / (time.perf_counter() - t0):,.0f} images/s")
    diff = np.abs(scores["stage, CPU decode"] - scores["stage, device decode"])
    print(f"scores, device decode vs CPU decode: max |diff| {diff.max():.4f}, mean {diff.mean():.5f}")
    print(f"driver peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")
    if not a.no_ray:
        del scorer, preps
        on_ray(cfg, images, captions, a.batch, cuda)


if __name__ == "__main__":
    main()
