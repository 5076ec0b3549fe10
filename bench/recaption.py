"""Recaptioning throughput: mm1data's recaption stage (CocaCaptioner on a batch of staged rows: JPEG decode, resize,
normalise, greedy CoCa decoding, token decoding) against the model alone on the same batches (the same greedy loop
on pixel tensors made beforehand), on CPU in fp32 and, where CUDA is present, on the GPU in bf16.

    python bench/recaption.py [--model coca_ViT-B-32] [--n 16] [--batch 8] [--max-tokens 30] [--ray]

Weights are random (`pretrained: null`): the speed is the same as trained weights' per generated token, but random
weights almost never pick the end token, so every caption runs to --max-tokens, the worst case (a trained model's
captions end sooner). Stage and model alone run batch by batch in turn, so load changes on a
shared machine hit both alike; the figures are wall time and CPU time (images per CPU-second = per core).
--ray also runs the stage as the pipeline does, on a Ray Data actor pool, and prints the worker's peak memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import resource
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_images(n: int) -> list[bytes]:
    """n photo-sized JPEGs (384x512, what the download stage keeps at its 512 px default): 8 distinct, cycled."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(min(n, 8)):
        x = np.linspace(0, 255, 512)[None, :, None] * np.ones((384, 1, 3))  # smooth, so JPEG sizes are photo-like
        arr = np.clip(x * (0.5 + 0.1 * i) + rng.normal(0, 12, x.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return [out[i % len(out)] for i in range(n)]


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def compare(stage, images: list[bytes], batch: int) -> dict[str, float]:
    """Wall and CPU seconds of the stage and of the model alone, batch by batch in turn, on the same batches."""
    import torch

    batches = [images[i : i + batch] for i in range(0, len(images), batch)]
    pixels = [stage.images(b)[0] for b in batches]  # the model-alone runs get their tensors made beforehand
    stage({"image": np.array(batches[0][:2], dtype=object), "drop_reason": np.array(["", ""], dtype=object)})  # warm
    sync = torch.cuda.synchronize if stage.device == "cuda" else (lambda: None)
    t = {"stage_wall": 0.0, "stage_cpu": 0.0, "model_wall": 0.0, "model_cpu": 0.0}
    for j, (b, px) in enumerate(zip(batches, pixels)):
        rows = {"image": np.array(b, dtype=object), "drop_reason": np.array([""] * len(b), dtype=object)}
        for which in ("stage", "model") if j % 2 == 0 else ("model", "stage"):  # either goes first, in turn
            w0, c0 = clocks()
            if which == "stage":
                assert all(stage(rows)["syn_caption"])
            else:
                ids = stage.generate(px)
            sync()
            w1, c1 = clocks()
            t[f"{which}_wall"] += w1 - w0
            t[f"{which}_cpu"] += c1 - c0
            if which == "model":
                t["model_best"] = min(t.get("model_best", np.inf), (w1 - w0) / len(b))
    # What the stage adds to the model, measured alone and at its best of 5 (a shared machine's load swings more
    # than this work weighs): decode + resize + normalise the batch's images, then decode the captions' tokens.
    best = np.inf
    for _ in range(5):
        w0, _ = clocks()
        stage.images(batches[0])
        sync()
        [stage.tokenizer.decode(i) for i in ids]
        best = min(best, time.perf_counter() - w0)
    t["extra_best"] = best / len(batches[0])
    return t


def report(label: str, n: int, t: dict[str, float], cores: int) -> None:
    print(
        f"{label}: stage {n / t['stage_wall']:.3f} images/s ({n / t['stage_cpu']:.3f} per CPU-second), "
        f"model alone {n / t['model_wall']:.3f} images/s ({n / t['model_cpu']:.3f} per CPU-second)"
    )
    print(f"  images/s per core (wall, {cores} cores): stage {n / t['stage_wall'] / cores:.3f}")
    print(
        f"  stage overhead against the model alone: {t['stage_wall'] / t['model_wall'] - 1:+.1%} wall, "
        f"{t['stage_cpu'] / t['model_cpu'] - 1:+.1%} CPU time (goal: under 10%)"
    )
    print(
        f"  the stage's own work alone (best of 5): {t['extra_best'] * 1e3:.1f} ms per image = "
        f"{t['extra_best'] / t['model_best']:.1%} of the model's best {t['model_best']:.2f} s per image"
    )


def on_ray(cfg, images: list[bytes], batch: int) -> None:
    """The stage as the pipeline runs it: one actor of a Ray Data actor pool (model loaded once, in the actor)."""
    from common import on_one_actor

    from mm1data.recaption import CocaCaptioner

    on_one_actor(
        CocaCaptioner, cfg, [{"image": im, "drop_reason": ""} for im in images], "syn_caption", batch, "images"
    )


def main() -> None:
    import torch

    from mm1data.recaption import CocaCaptioner, RecaptionConfig

    sys.stdout.reconfigure(line_buffering=True)  # figures appear as they come (runs are long on a shared CPU)
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="coca_ViT-B-32")  # the smallest CoCa open_clip ships
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=30)
    p.add_argument("--gpu-n", type=int, default=512)
    p.add_argument("--gpu-batch", type=int, default=128)
    p.add_argument("--ray", action="store_true")
    a = p.parse_args()
    cores = len(os.sched_getaffinity(0))
    images = make_images(max(a.n, a.gpu_n))
    print(f"{a.model}, random weights (pretrained: null), {a.max_tokens} tokens per caption (start and end included)")
    cfg = RecaptionConfig(enabled=True, model=a.model, pretrained=None, max_tokens=a.max_tokens, batch_size=a.batch)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-weights warning, said above
        cpu = CocaCaptioner(dataclasses.replace(cfg, device="cpu", precision="fp32"))
    print(f"CPU fp32: torch {torch.__version__}, {torch.get_num_threads()} threads, {cores} cores, "
          f"{a.n} images in batches of {a.batch}")  # fmt: skip
    report("CPU fp32", a.n, compare(cpu, images[: a.n], a.batch), cores)
    print(f"  driver peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")
    del cpu

    if torch.cuda.is_available():
        gpu = CocaCaptioner(dataclasses.replace(cfg, device="cuda", precision="bf16"))
        print(f"GPU bf16: {torch.cuda.get_device_name(0)}, {a.gpu_n} images in batches of {a.gpu_batch}")
        report("GPU bf16", a.gpu_n, compare(gpu, images[: a.gpu_n], a.gpu_batch), cores)
        print(f"  GPU peak memory {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB")
        del gpu
    else:
        print("GPU bf16: skipped (no CUDA device on this machine)")

    if a.ray:
        on_ray(dataclasses.replace(cfg, device="cpu"), images[: a.n], a.batch)


if __name__ == "__main__":
    main()
