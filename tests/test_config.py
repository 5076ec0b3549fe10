"""Run configs: YAML + --set overrides, unknown keys named, the shipped pipeline config loads."""

from __future__ import annotations

import pytest

from mm1data.config import ConfigError
from mm1data.pipelines import load_run_config


def test_shipped_caption_config_and_overrides():
    _, cfg = load_run_config(
        "pipelines/caption.yaml",
        ["download.timeout_s=5", "clip.pretrained=null", "filters=[]", "input.extra_cols=[id]"],
    )
    assert cfg.download.timeout_s == 5.0 and cfg.clip.pretrained is None
    assert cfg.filters == () and cfg.input.extra_cols == ("id",)
    assert cfg.filters != load_run_config("pipelines/caption.yaml")[1].filters


@pytest.mark.parametrize(
    "override,match",
    [
        ("download.timeoutt=5", "unknown config key 'download.timeoutt'"),
        ("nope=1", "unknown config key 'nope'"),
        ("download.timeout_s=abc", "download.timeout_s"),
        ("download.resize_mode=stretch", "resize_mode"),
    ],
)
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_run_config("pipelines/caption.yaml", [override])
