"""Shared fixtures: a local image server, tiny images, a moto S3 server and one Ray session for the suite."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mm1data.demo import ImageServer, Route

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray's local instance binds the host's address by default; this keeps it (and the CLI runs the tests start,
# which inherit the environment) on 127.0.0.1, the only address tests may use.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def jpeg(w: int = 320, h: int = 240, color: tuple = (200, 40, 40), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.full((h, w, 3), color, dtype=np.uint8)
    arr[rng.integers(0, h, 50), rng.integers(0, w, 50)] = 255  # distinct bytes per seed
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming a huge image, with a tiny body: the guard must refuse it before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def bad_routes() -> dict[str, Route]:
    """Every bad input of the issue, by path (the good ones are added by each test)."""
    good = jpeg(300, 260, seed=99)
    return {
        # 500 then success; seed 77: seed 7 would be a pHash near-duplicate (6 bits) of the tests' /img/7.jpg
        "/flaky.jpg": Route(jpeg(280, 280, seed=77), fail_first=1),
        "/slow.jpg": Route(jpeg(seed=8), delay_s=3.0),  # slower than the timeout
        "/loop": Route(b"", status=302, headers={"Location": "/loop"}),
        "/page.html": Route(b"<html></html>", headers={"Content-Type": "text/html"}),
        "/truncated.jpg": Route(good[: len(good) // 2]),
        "/random.jpg": Route(np.random.default_rng(1).bytes(5000)),
        "/bomb.png": Route(png_bomb(), headers={"Content-Type": "image/png"}),
        "/big.jpg": Route(jpeg(1600, 1600, seed=9) + b"\0" * 300_000),
        "/noai.jpg": Route(jpeg(seed=10), headers={"Content-Type": "image/jpeg", "X-Robots-Tag": "noai"}),
        "/forbidden.jpg": Route(b"no", status=403, headers={"Content-Type": "text/plain"}),
    }


@pytest.fixture
def server():
    with ImageServer({}) as srv:
        yield srv


@pytest.fixture(scope="session")
def _s3_stack():
    """moto's S3 server on 127.0.0.1 behind the fault proxy (tests/faults.py), which forwards only until a test
    turns faults on."""
    from faults import FaultProxy
    from moto.server import ThreadedMotoServer

    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    proxy = FaultProxy(f"http://{host}:{port}").start()
    env = {
        "AWS_ENDPOINT_URL": proxy.url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update(env)
    yield env, proxy
    proxy.stop()
    srv.stop()


@pytest.fixture(scope="session")
def s3_server(_s3_stack):
    """S3 on 127.0.0.1 (moto's server, through the fault proxy with faults off), reached by real boto3 through
    AWS_ENDPOINT_URL."""
    return _s3_stack[0]


@pytest.fixture(scope="session")
def fault_proxy(_s3_stack):
    """The proxy in front of moto: `with fault_proxy.faults(rate_503=0.25, rate_cut=0.1): ...` injects faults into
    every S3 request of this process and of Ray and DataLoader workers (they reach S3 through it too)."""
    return _s3_stack[1]


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for the whole suite (started after the S3 env so workers inherit it, the fault proxy's endpoint
    included)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def photo(seed: int, w: int = 240, h: int = 180) -> Image.Image:
    """A photo-like picture: a smooth field from a coarse colour grid, a few hard-edged shapes, fine noise (pHashes
    of two seeds lie ~32 bits apart; the flat jpeg() images all look alike to a pHash)."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), dtype=np.float64)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w - 30)), int(rng.integers(0, h - 30))
        img[y0 : y0 + int(rng.integers(15, h // 2)), x0 : x0 + int(rng.integers(15, w // 2))] = rng.integers(0, 256, 3)
    img += rng.normal(0, 5, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def encode(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def near_copies(im: Image.Image) -> dict[str, bytes]:
    """Planted near-duplicates of a picture, as JPEG bytes: recompressed at quality 30 and 60, resized to 70%,
    cropped 3% on every side, brighter by 8%, colour-shifted (R +8, B -8)."""
    from PIL import ImageEnhance

    w, h = im.size
    shifted = np.clip(np.asarray(im, dtype=np.int16) + np.array([8, 0, -8]), 0, 255).astype(np.uint8)
    return {
        "q30": encode(im, 30),
        "q60": encode(im, 60),
        "resized": encode(im.resize((w * 7 // 10, h * 7 // 10), Image.LANCZOS)),
        "cropped": encode(im.crop((w * 3 // 100, h * 3 // 100, w - w * 3 // 100, h - h * 3 // 100))),
        "brighter": encode(ImageEnhance.Brightness(im).enhance(1.08)),
        "shifted": encode(Image.fromarray(shifted)),
    }
