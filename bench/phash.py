"""pHash speed against imagehash, near-duplicate precision and recall at k = 2..10, and the LSH step's memory.

speed     --n decoded RGB images (640x480, smooth random colour fields with edges and noise, as photos have:
          np.random.default_rng(0)), each hashed by imagehash.phash, by mm1data.phash.phash_many (exact: the same
          bits) and by phash_many(fast=True) (box-reduced before Lanczos), in this one process and thread,
          images/s; how often fast mode's bits differ from imagehash's, and by how many
quality   --bases planted originals (like the speed images); per original its near-duplicates: resized to 60%,
          JPEG at quality 30, 50, 75 and 90, cropped 3% and 6% on every side, brightness +12, a colour shift
          (R +10, B -10); and four distinct look-alikes: the original mirrored, a picture with the same coarse
          layout (the same 4x4 colour grid, other detail), the same scene with other objects, and the original
          with one more object (a rectangle of a ninth of its area). Each image is first resized to 512 px and
          re-encoded as the download stage stores it, then hashed. Precision and recall of "Hamming <= k" over
          all pairs (a positive: an original and one of its near-duplicates, or two near-duplicates of one
          original), and the recall of the band LSH (mm1data.dedup._image_matches: bands = k + 1, cap
          MAX_BUCKET) against those brute-force pairs; then the LSH recall per planted distance when oversized
          buckets are cut as they would be at 2B images
memory    bytes per image of the band rows the LSH shuffles (per 10M hashes), and a run of dedup.image_matches
          on a local Ray over --lsh-n hashes: the driver's peak RSS and the largest Ray worker's (bench/common);
          run it alone (--n 0 --bases 0) for a driver figure that the other parts' images do not swell

  .venv/bin/python bench/phash.py [--n 400] [--bases 300] [--lsh-n 1000000]   (0 skips a part)
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import sys
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from PIL import Image, ImageEnhance, ImageOps  # noqa: E402

from mm1data.phash import from_hex, hamming, phash_many  # noqa: E402

KS = (2, 4, 6, 8, 10)


def photo(
    rng: np.random.Generator, w: int = 640, h: int = 480, grid: np.ndarray | None = None, detail=None
) -> Image.Image:
    """A photo-like image: a smooth field from a coarse colour grid and a finer one, a few hard-edged shapes (the
    objects), fine noise."""
    grid = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) if grid is None else grid
    detail = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8) if detail is None else detail
    base = np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), dtype=np.int16)
    img = base * 0.7 + np.asarray(Image.fromarray(detail).resize((w, h)), np.int16) * 0.3
    for _ in range(4):  # rectangles with hard edges
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        x1, y1 = x0 + int(rng.integers(20, w // 3)), y0 + int(rng.integers(20, h // 3))
        img[y0:y1, x0:x1] = rng.integers(0, 256, 3)
    img = img + rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def jpeg(im: Image.Image, q: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def crop(im: Image.Image, f: float) -> Image.Image:
    w, h = im.size
    return im.crop((int(w * f), int(h * f), w - int(w * f), h - int(h * f)))


def shift(im: Image.Image) -> Image.Image:
    a = np.asarray(im, dtype=np.int16) + np.array([10, 0, -10])
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


VARIANTS = {
    "resize 60%": lambda im: im.resize((im.width * 6 // 10, im.height * 6 // 10), Image.LANCZOS),
    "jpeg q30": lambda im: jpeg(im, 30),
    "jpeg q50": lambda im: jpeg(im, 50),
    "jpeg q75": lambda im: jpeg(im, 75),
    "jpeg q90": lambda im: jpeg(im, 90),
    "crop 3%": lambda im: crop(im, 0.03),
    "crop 6%": lambda im: crop(im, 0.06),
    "brightness +12": lambda im: ImageEnhance.Brightness(im).enhance(1.12),
    "colour shift": shift,
}


def new_object(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    a = np.asarray(im).copy()
    h, w = a.shape[:2]
    y, x = int(rng.integers(0, h - h // 3)), int(rng.integers(0, w - w // 3))
    a[y : y + h // 3, x : x + w // 3] = rng.integers(0, 256, 3)
    return Image.fromarray(a)


def stored(im: Image.Image) -> Image.Image:
    """What the download stage hashes: resized to 512 px on the long side (keep_ratio), JPEG 95."""
    s = 512 / max(im.size)
    return jpeg(im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BICUBIC), 95)


def planted(bases: int) -> tuple[list[Image.Image], np.ndarray, list[str]]:
    """-> images, group of each (the original's index; look-alikes get their own), and what each image is."""
    rng = np.random.default_rng(1)
    images, group, what = [], [], []
    for b in range(bases):
        grid = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        detail = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        orig = photo(rng, grid=grid, detail=detail)
        images.append(orig), group.append(b), what.append("original")
        for name, fn in VARIANTS.items():
            images.append(fn(orig)), group.append(b), what.append(name)
        looks = {
            "look-alike: mirrored": ImageOps.mirror(orig),
            "look-alike: other objects": photo(rng, grid=grid, detail=detail),  # the same scene, other shapes
            "look-alike: layout": photo(rng, grid=grid),  # the same coarse colours, other detail and shapes
            "look-alike: new object": new_object(orig, rng),  # the same picture with one more object in it
        }
        for g, (name, im) in enumerate(looks.items()):
            images.append(im), group.append(bases + 4 * b + g), what.append(name)
    return [stored(im) for im in images], np.array(group), what


def speed(n: int) -> None:
    import imagehash

    rng = np.random.default_rng(0)
    images = [photo(rng) for _ in range(n)]
    for im in images[:5]:  # warm-up (imports, caches)
        imagehash.phash(im)
    phash_many(images[:5]), phash_many(images[:5], fast=True)
    # in rounds, each method on the same slice in turn: the machine's load moves, and so each gets the same share
    t_ref = t_exact = t_fast = 0.0
    ref, exact, fast = [], [], []
    for a in range(0, n, 20):
        part = images[a : a + 20]
        t = time.perf_counter()
        ref += [str(imagehash.phash(im)) for im in part]
        t_ref += time.perf_counter() - t
        t = time.perf_counter()
        exact.append(phash_many(part))
        t_exact += time.perf_counter() - t
        t = time.perf_counter()
        fast.append(phash_many(part, fast=True))
        t_fast += time.perf_counter() - t
    exact, fast = np.concatenate(exact), np.concatenate(fast)
    want = np.array([from_hex(s) for s in ref], dtype=np.int64)
    d = hamming(fast, want)
    print(f"speed: {n} decoded 640x480 RGB images, one thread")
    print(f"  {'imagehash.phash':<28}{n / t_ref:>9,.0f} images/s")
    print(f"  {'phash_many (exact)':<28}{n / t_exact:>9,.0f} images/s  {t_ref / t_exact:.2f}x  "
          f"identical to imagehash: {(exact == want).mean():.1%}")  # fmt: skip
    print(f"  {'phash_many (fast=True)':<28}{n / t_fast:>9,.0f} images/s  {t_ref / t_fast:.2f}x  "
          f"identical: {(d == 0).mean():.1%}, Hamming to imagehash: "
          + ", ".join(f"{k}: {c}" for k, c in enumerate(np.bincount(d)) if c))  # fmt: skip


def quality(bases: int) -> None:
    from mm1data.dedup import MAX_BUCKET, _image_matches, _ImageBandRows

    images, group, what = planted(bases)
    ph = phash_many(images)
    n = len(ph)
    i, j = np.triu_indices(n, 1)
    d = hamming(ph[i], ph[j])
    pos = group[i] == group[j]
    print(f"\nquality: {bases} originals, {len(VARIANTS)} near-duplicates and 4 look-alikes each ({n} images, "
          f"{int(pos.sum())} positive pairs of {len(d):,})")  # fmt: skip
    dv = {
        name: []
        for name in (
            *VARIANTS,
            "look-alike: mirrored",
            "look-alike: other objects",
            "look-alike: layout",
            "look-alike: new object",
        )
    }
    orig_at = {g: k for k, (g, w) in enumerate(zip(group, what)) if w == "original"}
    for k, w in enumerate(what):
        if w != "original":
            o = orig_at.get(group[k], orig_at.get((group[k] - bases) // 4))
            dv[w].append(int(hamming(ph[k], ph[o])))
    print("  Hamming to its original, median [max]: " + "; ".join(
        f"{w} {int(np.median(v))} [{max(v)}]" for w, v in dv.items()))  # fmt: skip
    print(f"  {'k':>3} {'precision':>10} {'recall':>8} {'pairs <= k':>11} {'LSH recall':>11} {'bands':>6}")
    for k in KS:
        hit = d <= k
        tp = int((hit & pos).sum())
        prec = tp / max(1, int(hit.sum()))
        rec = tp / int(pos.sum())
        bands = k + 1
        items = {
            "id": np.arange(n, dtype=np.int64),
            "sub": np.full(n, -1, np.int32),
            "phash": ph,
            "shahi": np.zeros(n, np.uint64),
            "shalo": np.zeros(n, np.uint64),
            "score": np.zeros(n),
            "n": np.zeros(n, np.int32),
            "ref": np.zeros(n, np.int8),
            "has_phash": np.ones(n, bool),
        }
        out = _image_matches(_ImageBandRows(bands, 1, False)(items), k=k, bands=bands, cap=MAX_BUCKET)
        found = {(min(a, b), max(a, b)) for a, b in zip(out["a"].tolist(), out["b"].tolist())}
        brute = set(zip(i[hit].tolist(), j[hit].tolist()))
        lsh = len(found & brute) / max(1, len(brute))
        assert found <= brute  # verified pairs only
        print(f"  {k:>3} {prec:>10.3f} {rec:>8.3f} {int(hit.sum()):>11,} {lsh:>11.3f} {bands:>6}")


def cut_recall(k: int = 8, n: int = 100_000) -> None:
    """LSH recall by planted distance with the buckets cut as at 2B images: with bands of 7 bits a bucket holds
    2e9 / 128 = 16M images, cut by the next band (14 bits: 120k) and the next (21 bits: ~1k <= MAX_BUCKET). Here
    n random hashes and cap = n / 2**14 / 8 reproduce that: the 7- and 14-bit buckets are cut, the 21-bit ones
    not."""
    from mm1data.dedup import _image_matches, _ImageBandRows

    rng = np.random.default_rng(2)
    base = rng.integers(-(1 << 63), (1 << 63) - 1, n, dtype=np.int64)
    m = 2000  # planted pairs per distance
    ph, pairs = [base], []
    at = n
    for dist in range(1, k + 1):  # other originals per distance: a bucket holds one planted pair, not a cluster
        a = base[(dist - 1) * m : dist * m]
        flips = np.zeros(m, dtype=np.uint64)
        for r in range(m):
            for b in rng.choice(64, dist, replace=False):
                flips[r] |= np.uint64(1) << np.uint64(b)
        ph.append((a.view(np.uint64) ^ flips).view(np.int64))
        pairs.append((dist, (dist - 1) * m + np.arange(m), at + np.arange(m)))
        at += m
    ph = np.concatenate(ph)
    N = len(ph)
    items = {
        "id": np.arange(N, dtype=np.int64),
        "sub": np.full(N, -1, np.int32),
        "phash": ph,
        "shahi": np.zeros(N, np.uint64),
        "shalo": np.zeros(N, np.uint64),
        "score": np.zeros(N),
        "n": np.zeros(N, np.int32),
        "ref": np.zeros(N, np.int8),
        "has_phash": np.ones(N, bool),
    }
    cap = max(2, n // 2**14 // 8)
    rows = _ImageBandRows(k + 1, 1, False)(items)
    for label, c in (("no cut", 1 << 30), (f"cut as at 2B (cap {cap})", cap)):
        t = time.perf_counter()
        out = _image_matches(rows, k=k, bands=k + 1, cap=c)
        found = {(min(a, b), max(a, b)) for a, b in zip(out["a"].tolist(), out["b"].tolist())}
        rec = [np.mean([(int(a), int(b)) in found for a, b in zip(x, y)]) for _, x, y in pairs]
        print(f"  k={k}, {label:<24} recall at distance 1..{k}: " + " ".join(f"{r:.2f}" for r in rec)
              + f"   ({time.perf_counter() - t:.1f} s)")  # fmt: skip


def memory(n: int, k: int = 8) -> None:
    import ray
    from common import PeakRSS

    from mm1data.dedup import _ITEM_TYPES, image_matches

    bands = k + 1
    row_bytes = 8 + 4 + 8 + sum(np.dtype(t).itemsize for t in _ITEM_TYPES.values())  # part, band, key + item
    print(f"\nmemory: a band row is {row_bytes} B; {bands} bands: {row_bytes * bands} B per image, "
          f"{row_bytes * bands * 10_000_000 / 2**30:.1f} GiB of band rows per 10M hashes (spread over the "
          f"shuffle's groups: a group holds at most IMAGE_BAND_ROWS_PER_GROUP rows)")  # fmt: skip
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    import pyarrow as pa

    from mm1data.dedup import task_shuffles

    rng = np.random.default_rng(3)
    with PeakRSS("ray::", new_only=False) as rss, task_shuffles():
        t = time.perf_counter()
        chunk = 250_000
        tables = []
        for a in range(0, n, chunk):
            m = min(chunk, n - a)
            ph = rng.integers(-(1 << 63), (1 << 63) - 1, m, dtype=np.int64)
            ph[: m // 10] = ph[m // 10 : 2 * (m // 10)] ^ 3  # 10% planted near-duplicates (2 bits)
            tables.append(pa.table({
                "id": np.arange(a, a + m, dtype=np.int64), "sub": np.full(m, -1, np.int32), "phash": ph,
                "shahi": np.zeros(m, np.uint64), "shalo": np.zeros(m, np.uint64), "score": np.zeros(m),
                "n": np.zeros(m, np.int32), "ref": np.zeros(m, np.int8), "has_phash": np.ones(m, bool),
            }))  # fmt: skip
        items = ray.data.from_arrow(tables)
        found = image_matches(items, bands, k, False).materialize()
        edges = found.count()
        wall = time.perf_counter() - t
    r = rss.result()
    print(f"  image_matches over {n:,} hashes on a local Ray (2 CPUs): {edges:,} edges, {wall:.0f} s; driver peak "
          f"RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB (Ray's client included); "
          f"largest worker peak RSS {r.get('peak_rss_mib', 0):,.0f} MiB, private "
          f"{r.get('peak_private_mib', 0):,.0f} MiB")  # fmt: skip
    ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--bases", type=int, default=300)
    ap.add_argument("--lsh-n", type=int, default=1_000_000)
    args = ap.parse_args()
    if args.n:
        speed(args.n)
    if args.bases:
        quality(args.bases)
        cut_recall()
    if args.lsh_n:
        memory(args.lsh_n)


if __name__ == "__main__":
    main()
