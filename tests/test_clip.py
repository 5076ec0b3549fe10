"""CLIP scoring with a random-weight tiny open_clip model: scores on kept rows only, weights from a local path."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
from conftest import jpeg

from mm1data.scorers.clip import MODEL_CONFIGS, ClipConfig, ClipScorer, ImagePreprocessor


def batch(n: int = 4) -> dict:
    return {
        "image": np.array([jpeg(120 + 10 * i, 100, seed=i) for i in range(n)], dtype=object),
        "caption": np.array([f"picture {i}" for i in range(n)], dtype=object),
        "drop_reason": np.array(["", "", "http_404", ""][:n], dtype=object),
    }


def test_scores_kept_rows_and_nan_on_dropped():
    with pytest.warns(UserWarning, match="random weights"):
        scorer = ClipScorer(ClipConfig(model="mm1data-tiny-clip", pretrained=None))
    out = scorer(batch())
    s = out["clip_score"]
    assert s.dtype == np.float32 and np.isnan(s[2]) and not np.isnan(s[[0, 1, 3]]).any()
    assert np.all(np.abs(s[[0, 1, 3]]) <= 1.0)
    again = scorer(batch())["clip_score"]
    np.testing.assert_allclose(again[[0, 1, 3]], s[[0, 1, 3]], rtol=1e-5)  # deterministic in eval mode


def test_weights_load_from_a_local_checkpoint(tmp_path):
    import open_clip
    import torch

    open_clip.add_model_config(MODEL_CONFIGS)
    torch.manual_seed(1)
    model = open_clip.create_model("mm1data-tiny-clip", pretrained=None)
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    a = ClipScorer(ClipConfig(model="mm1data-tiny-clip", pretrained=str(path)))(batch())["clip_score"]
    b = ClipScorer(ClipConfig(model="mm1data-tiny-clip", pretrained=str(path)))(batch())["clip_score"]
    np.testing.assert_allclose(a[[0, 1, 3]], b[[0, 1, 3]], rtol=1e-5)  # same weights, same scores
    with pytest.warns(UserWarning):
        c = ClipScorer(ClipConfig(model="mm1data-tiny-clip", pretrained=None))(batch())["clip_score"]
    assert not np.allclose(a[[0, 1, 3]], c[[0, 1, 3]])  # the checkpoint really was loaded


def test_a_pretrained_tag_without_internet_fails_clearly():
    with pytest.raises(Exception):  # noqa: B017  (open_clip/hf raise different types offline)
        ClipScorer(ClipConfig(model="mm1data-tiny-clip", pretrained="laion2b_s34b_b79k"))


# --- decoding: the tensor path (torchvision decode_jpeg + v2 resize, nvJPEG on CUDA) against open_clip's PIL steps ---


def photo(w: int, h: int, seed: int, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    """Smooth gradients plus noise (a flat image would hide resampling differences)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (w + h)], -1)
    arr = np.clip(arr + rng.integers(-25, 25, arr.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


# sizes: larger and smaller than the tiny model's 64 px input, landscape, portrait, odd; sizes that come back later in
# the batch (the tensor path resizes each size's images together, and must put them back in their places)
SIZES = [(320, 240), (97, 211), (64, 64), (320, 240), (40, 30), (1000, 333), (97, 211), (65, 66)]


@pytest.fixture(scope="module")
def tiny():
    with pytest.warns(UserWarning, match="random weights"):
        return ClipScorer(ClipConfig(model="mm1data-tiny-clip", pretrained=None, device="cpu"))


def open_clip_pixels(scorer, images: list[bytes]):
    """open_clip's own eval transform (PIL), image by image: the reference."""
    import torch
    from PIL import Image

    return torch.stack([scorer.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])


def test_the_tensor_path_on_cpu_gives_open_clips_pixels_and_scores(tiny):
    """decode_jpeg + v2 resize/crop on tensors against open_clip's PIL transform. JPEG decoding is the same
    libjpeg-turbo (identical pixels); resizing differs by rounding only: both are antialiased bicubic with a = -0.5,
    but PIL resamples in two 8-bit passes (rounding between them) where torch keeps the intermediate in float. So a
    pixel may differ by at most 2 of 255 levels (seen: <= 2, mean ~0.01), and scores by at most 1e-3 (seen: ~1e-4)."""
    images = [photo(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    tensor = ImagePreprocessor(tiny.preprocess, tiny.model, "cpu", decode="tensor")
    assert tensor.decode == "tensor" and tensor.geometry is not None
    assert tiny.images.decode == "pil"  # on CPU, today's PIL path stays the default (as fast; `draft` on big JPEGs)
    ref = open_clip_pixels(tiny, images)
    got, ok = tensor(images)
    assert list(ok) == list(range(len(images))) and got.shape == ref.shape == (len(images), 3, 64, 64)
    levels = ((got - ref).abs() * tensor.std.view(1, 3, 1, 1) * 255).amax()
    assert levels <= 2.01
    captions = [f"picture {i}" for i in range(len(images))]
    text = tiny.embed_texts(captions)
    ref_scores = (tiny._encode(ref) * text).sum(-1)
    tiny_tensor = copy.copy(tiny)
    tiny_tensor.images = tensor
    np.testing.assert_allclose(tiny_tensor.similarity(images, captions), ref_scores.numpy(), atol=1e-3)


def test_other_formats_cmyk_grayscale_and_bad_bytes_fall_back_or_fail_as_rows(tiny):
    """PNG, WebP, GIF and CMYK JPEG go through PIL, grayscale and RGB JPEG through decode_jpeg; both agree with
    open_clip's transform. A file no decoder reads (random bytes, a truncated JPEG, empty) is left out: the scorer
    marks its row decode_error with a NaN score and scores the others as it would alone."""
    good = {
        "rgb": photo(120, 90, 1),
        "gray": photo(120, 90, 2, mode="L"),
        "cmyk": photo(120, 90, 3, mode="CMYK"),
        "png": photo(120, 90, 4, fmt="PNG"),
        "webp": photo(120, 90, 5, fmt="WEBP"),
        "gif": photo(120, 90, 6, mode="P", fmt="GIF"),
    }
    on_device = {name: ImagePreprocessor._on_device(data) for name, data in good.items()}
    assert on_device == {"rgb": True, "gray": True, "cmyk": False, "png": False, "webp": False, "gif": False}
    tensor = ImagePreprocessor(tiny.preprocess, tiny.model, "cpu", decode="tensor")
    images = list(good.values())
    ref = open_clip_pixels(tiny, images)
    got, ok = tensor(images)
    assert list(ok) == list(range(len(images)))
    assert ((got - ref).abs() * tensor.std.view(1, 3, 1, 1) * 255).amax() <= 2.01

    bad = [np.random.default_rng(0).bytes(3000), good["rgb"][: len(good["rgb"]) // 2], b""]
    mixed = [bad[0], good["rgb"], bad[1], good["png"], bad[2]]
    for pre in (tensor, tiny.images):
        pixels, ok = pre(mixed, skip_bad=True)
        assert list(ok) == [1, 3] and pixels.shape[0] == 2
        with pytest.raises(Exception):  # noqa: B017  (PIL raises different types for different damage)
            pre(mixed)
    rows = {
        "image": np.array(mixed, dtype=object),
        "caption": np.array([f"c {i}" for i in range(5)], dtype=object),
        "drop_reason": np.array([""] * 5, dtype=object),
    }
    out = tiny(rows)
    assert list(out["drop_reason"]) == ["decode_error", "", "decode_error", "", "decode_error"]
    s = out["clip_score"]
    assert np.isnan(s[[0, 2, 4]]).all()
    np.testing.assert_allclose(s[[1, 3]], tiny.similarity([good["rgb"], good["png"]], ["c 1", "c 3"]), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_cuda_decodes_jpegs_with_nvjpeg_and_matches_the_cpu_scores():
    """On CUDA the default is the tensor path (nvJPEG, batched); its fp32 scores match open_clip's PIL transform on
    CPU within the tolerance of the CPU test (plus fp32 GPU arithmetic), and bad files fall back or fail as rows."""
    scorer = ClipScorer(ClipConfig(model="mm1data-tiny-clip", pretrained=None, device="cuda", precision="fp32"))
    assert scorer.images.decode == "tensor"
    images = [photo(w, h, seed=i) for i, (w, h) in enumerate(SIZES)] + [photo(120, 90, 9, mode="L")]
    images += [photo(120, 90, 10, mode="CMYK"), photo(120, 90, 11, fmt="PNG")]
    captions = [f"picture {i}" for i in range(len(images))]
    ref = open_clip_pixels(scorer, images).cuda()
    text = scorer.embed_texts(captions)
    ref_scores = (scorer._encode(ref) * text).sum(-1).cpu().numpy()
    np.testing.assert_allclose(scorer.similarity(images, captions), ref_scores, atol=2e-3)
    mixed = [b"\xff\xd8\xff" + bytes(500), images[0], images[0][:300], images[-1]]
    pixels, ok = scorer.images(mixed, skip_bad=True)
    assert list(ok) == [1, 3] and pixels.device.type == "cuda"
