"""Filters annotate: exact score columns and drop reasons per row; chains parse from presets and inline lists."""

from __future__ import annotations

import numpy as np
import pytest

from mm1data.config import ConfigError
from mm1data.filters import FilterChain, FilterConfig, parse_chain


def batch(**cols) -> dict:
    return {k: np.array(v, dtype=object if isinstance(v[0], str) else None) for k, v in cols.items()}


def test_caption_filters_mark_first_failure_only():
    b = batch(caption=["a red dog on grass", "hi", "dog", "  tiny  "], drop_reason=["", "", "", "http_404"])
    chain = FilterChain((FilterConfig("caption_words", min=3), FilterConfig("caption_chars", min=6)))
    out = chain(b)
    assert list(out["drop_reason"]) == ["", "caption_words", "caption_words", "http_404"]
    assert list(out["caption_words"]) == [5, 1, 1, 1]
    assert list(out["caption_chars"]) == [18, 2, 3, 4]


def test_image_filters_use_original_size_and_skip_missing_images():
    b = batch(orig_width=[400, 150, 1000, 0], orig_height=[300, 400, 200, 0], drop_reason=["", "", "", "timeout"])
    out = FilterChain((FilterConfig("image_min_side", min=200), FilterConfig("image_aspect", max=3)))(b)
    assert list(out["drop_reason"]) == ["", "image_min_side", "image_aspect", "timeout"]
    assert out["image_aspect"][2] == 5.0 and np.isnan(out["image_min_side"][3])


def test_lang_filter_with_lid176():
    b = batch(
        caption=[
            "a photo of a dog running on the beach",
            "ein Hund läuft am Strand entlang",
            "un chien qui court sur la plage",
        ],
        drop_reason=["", "", ""],
    )
    out = FilterChain((FilterConfig("lang", params={"languages": ["en"]}),))(b)
    assert list(out["lang_id"]) == ["en", "de", "fr"]
    assert list(out["drop_reason"]) == ["", "lang", "lang"]
    assert out["lang"][0] > 0.5 and out["lang"][1] < 0.1
    fr = FilterChain((FilterConfig("lang", params={"languages": ["en", "fr"]}),))(
        batch(caption=list(b["caption"]), drop_reason=["", "", ""])
    )
    assert list(fr["drop_reason"]) == ["", "lang", ""]


def test_clip_threshold_only_reads_the_score():
    b = {"clip_score": np.array([0.3, 0.1, np.nan], dtype=np.float32), "drop_reason": np.array(["", "", "x"], object)}
    out = FilterChain((FilterConfig("clip_score", min=0.28),))(b)
    assert list(out["drop_reason"]) == ["", "clip_score", "x"]


def test_presets_and_inline_chains_parse(tmp_path):
    chain = parse_chain("caption_datacomp", ("filters",))
    assert [c.name for c in chain] == ["lang", "caption_words", "caption_chars", "image_min_side", "image_aspect"]
    assert chain[1].min == 3 and chain[4].max == 3 and chain[0].params["languages"] == ["en"]
    assert [c.name for c in parse_chain("filters/caption_laion.yaml")] == ["lang", "clip_score"]
    assert parse_chain([]) == ()
    with pytest.raises(ConfigError, match="unknown filter 'nope'"):
        parse_chain([{"name": "nope"}])
    with pytest.raises(ConfigError, match="unknown key 'minimum'"):
        parse_chain([{"name": "caption_words", "minimum": 3}])
    with pytest.raises(ConfigError, match="filter chain not found"):
        parse_chain(str(tmp_path / "missing.yaml"))
