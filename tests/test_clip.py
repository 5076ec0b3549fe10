"""CLIP scoring with a random-weight tiny open_clip model: scores on kept rows only, weights from a local path."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import jpeg

from mm1data.scorers.clip import MODEL_CONFIGS, ClipConfig, ClipScorer


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
