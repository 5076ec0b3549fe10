"""CLIP scoring throughput of mm1data's ClipScorer on GPU (bf16 autocast) against the same scorer on CPU (fp32),
same random ViT-B-32 weights, same 256 px JPEG pairs; prints pairs/s, the ratio and the score agreement.

    python bench/gpu_clip.py [--model ViT-B-32] [--n 4096] [--batch 256] [--cpu-n 256]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_pairs(n: int) -> tuple[list[bytes], list[str]]:
    from PIL import Image

    rng = np.random.default_rng(0)
    imgs = []
    for _ in range(min(n, 64)):  # 64 distinct images, cycled: decode cost is real, generation is not timed
        arr = rng.integers(0, 255, (256, 320, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=90)
        imgs.append(buf.getvalue())
    return [imgs[i % len(imgs)] for i in range(n)], [f"a photo of thing number {i}" for i in range(n)]


def score(scorer, images, captions, batch: int) -> tuple[np.ndarray, float]:
    out = []
    scorer.similarity(images[:batch], captions[:batch])  # warm-up (cudnn autotune, allocator)
    t0 = time.perf_counter()
    for i in range(0, len(images), batch):
        out.append(scorer.similarity(images[i : i + batch], captions[i : i + batch]))
    return np.concatenate(out), time.perf_counter() - t0


def main() -> None:
    import torch

    from mm1data.scorers.clip import ClipConfig, ClipScorer

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--cpu-n", type=int, default=256)
    a = p.parse_args()
    images, captions = make_pairs(a.n)
    torch.manual_seed(0)
    gpu = ClipScorer(ClipConfig(model=a.model, pretrained=None))
    name = torch.cuda.get_device_name(0) if gpu.device == "cuda" else "no CUDA device (dry run on CPU)"
    print(f"device: {name}, torch {torch.__version__}, model {a.model} (random weights)")
    g_scores, g_t = score(gpu, images, captions, a.batch)
    print(f"GPU bf16: {a.n / g_t:,.0f} pairs/s ({a.n} pairs, batch {a.batch})")

    t0 = time.perf_counter()
    list(gpu.images.pool.map(gpu.images._pixels, images[:2048]))
    print(
        f"  of which decode + resize alone ({len(gpu.images.pool._threads) or 'n'} threads): "
        f"{min(2048, a.n) / (time.perf_counter() - t0):,.0f} images/s"
    )
    cpu = ClipScorer(ClipConfig(model=a.model, pretrained=None, device="cpu", precision="fp32"))
    cpu.model.load_state_dict(gpu.model.state_dict())  # the same weights, on the CPU in fp32
    c_scores, c_t = score(cpu, images[: a.cpu_n], captions[: a.cpu_n], min(a.batch, a.cpu_n))
    print(f"CPU fp32 ({torch.get_num_threads()} threads): {a.cpu_n / c_t:,.1f} pairs/s")
    print(f"ratio GPU/CPU: {(a.n / g_t) / (a.cpu_n / c_t):,.1f}x")
    diff = np.abs(g_scores[: a.cpu_n] - c_scores)
    print(f"score agreement bf16 vs fp32: max |diff| {diff.max():.4f}, mean {diff.mean():.4f}")


if __name__ == "__main__":
    main()
