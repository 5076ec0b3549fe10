"""Percentile thresholds: the exact radix select against a sort, the chain syntax, and its errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mm1data.config import ConfigError
from mm1data.filters import parse_chain
from mm1data.percentile import exact_threshold, float_keys, key_value, percentile_steps, select


def datacomp_threshold(scores: np.ndarray, fraction: float) -> float:
    """DataComp's baselines get_threshold: the n-th largest score of n = int(N * fraction)."""
    n = int(len(scores) * fraction)
    return float(-np.sort(-scores)[n - 1])


def test_keys_keep_float32_order():
    x = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 0.25, 7.0, np.inf], dtype=np.float32)
    k = float_keys(x)
    assert (np.diff(k.astype(np.int64)) >= 0).all() and k[3] == k[4]  # -0.0 counts as 0.0
    assert [key_value(v) for v in k] == [float(v) for v in x + np.float32(0)]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 100, 1001])
def test_rank_is_datacomps(n):
    scores = np.random.default_rng(n).permutation(n).astype(np.float32)  # distinct
    for q in (0, 10, 33.3, 50, 70, 90, 99.9):
        t = exact_threshold(scores, q, "min")
        if int(n * (100 - q) / 100 + 1e-9) >= 1:
            assert t == datacomp_threshold(scores, (100 - q) / 100), (n, q)
        top = n - math.ceil(n * q / 100 - 1e-9)  # the top floor(N (100 - q) / 100) rows
        assert (t is None) == (top == 0) and (t is None or int((scores >= t).sum()) == top), (n, q)
    assert exact_threshold(scores, 100, "min") is None  # the top 0% keeps nothing
    assert exact_threshold(scores, 0, "max") is None
    t = exact_threshold(scores, 30, "max")
    assert (t is None) == (n * 3 < 10) and (t is None or int((scores <= t).sum()) == n * 3 // 10)


def test_select_on_ray_is_exact(ray_session):
    """The two histogram passes over Ray blocks give exactly the sorted order statistic: error bound 0, on scores
    with ties, negative zero, infinities, NaN (not in the population) and values that share their top 16 bits."""
    import ray

    rng = np.random.default_rng(0)
    scores = np.concatenate(
        [
            rng.normal(0.25, 0.05, 20_000),
            np.full(500, 0.3),  # a big tie
            0.3 + np.arange(300) * 1e-7,  # one top-16-bit bin, many low digits
            [-0.0, 0.0, -np.inf, np.inf, np.nan, np.nan],
        ]
    ).astype(np.float32)
    rng.shuffle(scores)
    ds = ray.data.from_items([{"_s0_score": float(s)} for s in scores], override_num_blocks=7).materialize()
    population = int((~np.isnan(scores)).sum())
    for q, side in [(70, "min"), (0, "min"), (99.99, "min"), (50, "max"), (2.5, "max"), (100, "max")]:
        n, value, failing = select(ds, "_s0_score", q, side)
        expected = exact_threshold(scores, q, side)
        assert n == population and value == expected, (q, side)
        ok = scores[~np.isnan(scores)]
        assert failing == int((ok < value).sum() if side == "min" else (ok > value).sum())


def test_chain_syntax():
    chain = parse_chain([{"name": "caption_words", "min": 3, "min_percentile": 70}, {"name": "clip_score"}])
    assert chain[0].min == 3 and chain[0].min_percentile == 70.0 and chain[0].max_percentile is None
    assert chain[0].per_row() == {"name": "caption_words", "min": 3.0, "max": np.inf, "params": {}}
    steps = percentile_steps(chain)
    assert [(s.name, s.side, s.percentile) for s in steps] == [("caption_words", "min", 70.0)]
    assert percentile_steps([{"name": "a", "max_percentile": 5}])[0].side == "max"  # index.json's dict form
    assert parse_chain("caption_datacomp_clip30")[-1].min_percentile == 70.0


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"name": "clip_score", "min_percentile": 101}, "min_percentile must be a number from 0 to 100"),
        ({"name": "clip_score", "max_percentile": "p70"}, "max_percentile must be a number from 0 to 100"),
        ({"name": "clip_score", "min_percentile": True}, "min_percentile must be a number"),
        ({"name": "para_words", "min_percentile": 50}, "a position-level filter has no score per row"),
        ({"name": "img_min_side", "max_percentile": 50}, "a position-level filter has no score per row"),
    ],
)
def test_chain_errors(entry, message):
    with pytest.raises(ConfigError, match=message):
        parse_chain([entry])


def test_config_show_keeps_percentiles():
    from mm1data.pipelines import show_config

    assert "min_percentile: 70" in show_config("caption", ["filters=caption_datacomp_clip30"])
