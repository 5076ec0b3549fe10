"""64-bit DCT perceptual hash (pHash) of decoded images, bit-identical to imagehash.phash, and Hamming distance.

imagehash.phash(img): img.convert("L").resize((32, 32), LANCZOS), scipy's unnormalised DCT-II along both axes, the
8x8 low-frequency corner, each bit = coefficient > the corner's median; str() is the 64 bits row-major, first bit
most significant, as 16 hex digits. phash() computes the same bits: the same Pillow calls for the 32x32 grey image
(most of the cost), then the 8x8 corner in one matrix product per batch (D8 @ X @ D8.T with D8 the first 8 rows of
the 32-point DCT-II matrix) instead of two full 32x32 FFT passes and Python objects per image. Where the two
float roundings could order the corner's values differently (a coefficient within 1e-9 of the median: flat and
synthetic images), the corner is recomputed with scipy.fftpack exactly as imagehash does, so bits stay identical.

fast=True reduces the image with Pillow's box reduce (reducing_gap=2) before the Lanczos step: several times
faster on large images, and its bits may differ from imagehash's by a few (bench/phash.py measures how often; see
ARCHITECTURE.md). The run's stages use the exact mode, so stored hashes compare with imagehash's.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image

HASH_SIZE = 8  # the 8x8 low-frequency corner: 64 bits
IMG_SIZE = 32  # HASH_SIZE * imagehash's highfreq_factor 4
_TIE_EPS = 1e-9  # relative to the corner's scale: closer to the median than this, scipy's own rounding decides
_REDUCING_GAP = 2.0  # fast mode: box-reduce to >= 2x the target before Lanczos (Pillow's reducing_gap)


def _dct_matrix() -> np.ndarray:
    # scipy.fftpack.dct type II, norm=None: y[k] = 2 * sum_n x[n] cos(pi k (2n + 1) / (2N))
    n = np.arange(IMG_SIZE)
    k = np.arange(HASH_SIZE)[:, None]
    return 2.0 * np.cos(np.pi * k * (2 * n + 1) / (2 * IMG_SIZE))


_D8 = _dct_matrix()  # (8, 32)
_WEIGHTS = (1 << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)  # first bit most significant


def grey32(image: Image.Image, fast: bool = False) -> np.ndarray:
    """The 32x32 uint8 grey image imagehash hashes (fast: box-reduced first, see the module docstring)."""
    gap = _REDUCING_GAP if fast else None  # None: PIL's default, what imagehash gets
    return np.asarray(image.convert("L").resize((IMG_SIZE, IMG_SIZE), Image.Resampling.LANCZOS, reducing_gap=gap))


def _corner_scipy(pixels: np.ndarray) -> np.ndarray:
    import scipy.fftpack

    return scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0), axis=1)[:HASH_SIZE, :HASH_SIZE]


def hash_pixels(pixels: np.ndarray) -> np.ndarray:
    """int64 hashes of a stack of 32x32 grey images, shape (n, 32, 32) -> (n,)."""
    x = np.asarray(pixels, dtype=np.float64).reshape(-1, IMG_SIZE, IMG_SIZE)
    corner = (_D8 @ x @ _D8.T).reshape(len(x), HASH_SIZE * HASH_SIZE)  # (n, 64)
    med = np.median(corner, axis=1, keepdims=True)
    # a value this close to the median may sit on the other side of it under scipy's rounding: redo those images
    scale = np.maximum(np.abs(corner).max(axis=1, keepdims=True), 1.0)
    tie = (np.abs(corner - med) <= _TIE_EPS * scale).any(axis=1)
    bits = corner > med
    for i in np.flatnonzero(tie):
        c = _corner_scipy(x[i]).ravel()
        bits[i] = c > np.median(c)
    return (bits.astype(np.uint64) @ _WEIGHTS).view(np.int64)  # uint64 matmul wraps exactly; int64 view = signed


def phash(image: Image.Image, fast: bool = False) -> int:
    """The 64-bit pHash as a signed int64 Python int; to_hex(phash(img)) == str(imagehash.phash(img))."""
    return int(hash_pixels(grey32(image, fast))[0])


def phash_many(images: Iterable[Image.Image], fast: bool = False) -> np.ndarray:
    """int64 pHashes of many images: the DCT and bit packing run once for the whole batch."""
    grids = [grey32(im, fast) for im in images]
    if not grids:
        return np.zeros(0, dtype=np.int64)
    return hash_pixels(np.stack(grids))


def to_hex(v: int) -> str:
    """16 lowercase hex digits of the 64 bits (imagehash's str form)."""
    return f"{int(v) & 0xFFFFFFFFFFFFFFFF:016x}"


def from_hex(s: str) -> int:
    """The signed int64 of a 16-hex-digit pHash (imagehash's str form)."""
    if len(s) != 16:
        raise ValueError(f"a pHash is 16 hex digits, got {s!r}")
    v = int(s, 16)
    return v - (1 << 64) if v >= 1 << 63 else v


_POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise Hamming distance (popcount of a ^ b) of int64 hash arrays (broadcasting as numpy does)."""
    # unsigned: numpy's bitwise_count of a signed value counts the bits of its absolute value
    x = np.asarray(np.bitwise_xor(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))).view(np.uint64)
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x).astype(np.int64)
    return _POP8[np.ascontiguousarray(x).view(np.uint8).reshape(*x.shape, 8)].sum(axis=-1, dtype=np.int64)
