"""Decode + resize + re-encode speed: mm1data's decode_image against img2dataset's Resizer, no network.

Draws --n distinct PIL JPEGs (640-1024 px a side, np.random.default_rng(0)) with mm1data.demo.draw_image, then
times, in this one process and thread, each implementation over all of them after a short untimed warm-up:
  img2dataset   Resizer(...)(BytesIO(body)): cv2 decode, albumentations resize (INTER_AREA down), cv2 encode
  mm1data       decode_image(body, cfg): PIL header read, JPEG draft decode, Lanczos resize, PIL encode
Both use the same --image-size and --resize-mode, jpg quality 95 and resize_only_if_bigger=True. Prints
images/s for each, the mm1data / img2dataset ratio, mean output width x height (warns if they differ by more than
1 px on average), mean output bytes, and the mean absolute pixel difference (0-255, per RGB channel) between the
two outputs decoded with PIL (pairs of different sizes are skipped and counted).

    .venv/bin/python bench/resize.py [--n 500] [--image-size 256] [--resize-mode keep_ratio|border|center_crop|...]
"""

from __future__ import annotations

import argparse
import io
import os
import time
from collections.abc import Callable

os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"  # albumentations would otherwise phone PyPI on import

import numpy as np  # noqa: E402
from img2dataset.resizer import Resizer  # noqa: E402
from PIL import Image  # noqa: E402

from mm1data.demo import draw_image  # noqa: E402
from mm1data.download import DownloadConfig, decode_image  # noqa: E402

WARMUP = 20
MODES = ("keep_ratio", "border", "center_crop", "keep_ratio_largest")


def make_images(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    bodies = []
    for _ in range(n):
        w, h = (int(x) for x in rng.integers(640, 1025, size=2))
        bodies.append(draw_image(rng, size=(w, h))[0])
    return bodies


def timed(fn: Callable[[bytes], tuple[bytes, int, int]], bodies: list[bytes]) -> tuple[float, list[tuple]]:
    """-> (images/s, [(out bytes, width, height)]) after an untimed warm-up on the first images."""
    for b in bodies[:WARMUP]:
        fn(b)
    t0 = time.perf_counter()
    outs = [fn(b) for b in bodies]
    return len(bodies) / (time.perf_counter() - t0), outs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--resize-mode", default="keep_ratio", choices=MODES)
    args = p.parse_args()

    t0 = time.perf_counter()
    bodies = make_images(args.n)
    mean_in = np.mean([len(b) for b in bodies])
    print(
        f"{args.n} JPEGs ({len(set(bodies))} distinct, 640-1024 px a side, mean {mean_in:.0f}"
        f" B) drawn in {time.perf_counter() - t0:.1f}s; image_size={args.image_size} resize_mode={args.resize_mode}"
        f", jpg q95, resize_only_if_bigger, 1 process x 1 thread"
    )

    resizer = Resizer(args.image_size, args.resize_mode, True, encode_format="jpg", encode_quality=95)

    def i2d(body: bytes) -> tuple[bytes, int, int]:
        data, w, h, _, _, err = resizer(io.BytesIO(body))
        if err:
            raise RuntimeError(f"img2dataset: {err}")
        return data, w, h

    cfg = DownloadConfig(
        image_size=args.image_size,
        resize_mode=args.resize_mode,
        resize_only_if_bigger=True,
        encode_format="jpg",
        encode_quality=95,
    )

    def mm1(body: bytes) -> tuple[bytes, int, int]:
        d = decode_image(body, cfg)
        return d.data, d.width, d.height

    results = {"img2dataset": timed(i2d, bodies), "mm1data": timed(mm1, bodies)}
    print(f"\n{'impl':<13}{'images/s':>10}{'mean w x h':>16}{'mean bytes':>12}")
    means = {}
    for name, (rate, outs) in results.items():
        means[name] = np.mean([(w, h) for _, w, h in outs], axis=0)
        mw, mh = means[name]
        print(f"{name:<13}{rate:>10.1f}{mw:>9.1f}x{mh:<6.1f}{np.mean([len(d) for d, _, _ in outs]):>12.0f}")
    print(f"ratio mm1data / img2dataset: {results['mm1data'][0] / results['img2dataset'][0]:.2f}")
    if np.abs(means["mm1data"] - means["img2dataset"]).max() > 1:
        print(f"WARNING: mean output sizes differ by more than 1 px: {means}")

    diffs, skipped = [], 0
    for (a, *size_a), (b, *size_b) in zip(results["img2dataset"][1], results["mm1data"][1]):
        if size_a != size_b:
            skipped += 1
            continue
        pa, pb = (np.asarray(Image.open(io.BytesIO(x)).convert("RGB"), dtype=np.int16) for x in (a, b))
        diffs.append(np.abs(pa - pb).mean())
    mad = f"{np.mean(diffs):.2f} (max per image {np.max(diffs):.2f})" if diffs else "n/a"
    print(f"mean |pixel difference| (0-255) over {len(diffs)} same-size pairs: {mad}; {skipped} pairs skipped")


if __name__ == "__main__":
    main()
