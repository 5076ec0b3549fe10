import imagehash
import numpy as np
import pytest
from PIL import Image

from mm1data.phash import from_hex, hamming, phash, phash_many, to_hex


def _images() -> list[Image.Image]:
    """Smooth colour fields with noise at several sizes and modes, flat images (every coefficient but DC ties) and
    the odd modes a download may give."""
    rng = np.random.default_rng(7)
    out = []
    for _ in range(60):
        w, h = int(rng.integers(20, 700)), int(rng.integers(20, 700))
        base = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        noise = rng.integers(-20, 20, (h, w, 3))
        out.append(Image.fromarray(np.clip(np.asarray(base, dtype=int) + noise, 0, 255).astype(np.uint8)))
    out += [Image.new("RGB", (64, 48), (v, v, v)) for v in (0, 1, 128, 255)]
    out += [Image.new("L", (1, 1), 9), Image.new("RGBA", (50, 70), (3, 4, 5, 100)), out[0].convert("P")]
    out += [out[1].convert("1"), out[2].convert("L"), out[3].convert("CMYK")]
    return out


def test_phash_equals_imagehash_bit_for_bit():
    images = _images()
    want = [str(imagehash.phash(im)) for im in images]
    assert [to_hex(phash(im)) for im in images] == want
    assert [to_hex(v) for v in phash_many(images)] == want
    assert phash_many(images).dtype == np.int64


def test_fast_mode_differs_by_few_bits_only():
    images = _images()
    exact = phash_many(images)
    fast = phash_many(images, fast=True)
    d = hamming(exact, fast)
    assert d.max() <= 2  # a reduced image moves a coefficient or two across the median, never more here
    assert (d == 0).mean() >= 0.8  # 58 of these 70 (noisy images: the worst case; bench/phash.py measures more)
    small = np.array([max(im.size) < 64 for im in images])  # nothing to reduce: the same Pillow calls
    assert (d[small] == 0).all()


def test_hex_round_trip_and_sign():
    for s in ("0000000000000000", "ffffffffffffffff", "8000000000000000", "7fffffffffffffff", "c3a1e0f0d8b4a596"):
        v = from_hex(s)
        assert -(1 << 63) <= v < 1 << 63
        assert to_hex(v) == s
    assert from_hex("ffffffffffffffff") == -1
    with pytest.raises(ValueError):
        from_hex("abc")


def test_hamming_is_popcount_of_xor():
    a = np.array([0, -1, from_hex("8000000000000001"), 5], dtype=np.int64)
    b = np.array([0, 0, 0, 6], dtype=np.int64)
    assert hamming(a, b).tolist() == [0, 64, 2, 2]
    assert hamming(a[:, None], a[None, :]).shape == (4, 4)


def test_empty_batch():
    assert phash_many([]).shape == (0,)
