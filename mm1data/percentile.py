"""Corpus-wide percentile thresholds (`{name: clip_score, min_percentile: 70}`): exact, on Ray, two histogram passes.

A percentile cannot be known while rows stream, so the per-row half only records the filter's score (and applies its
fixed min/max); the corpus-wide half (split.finalize) runs a PercentileThreshold step per such filter, before the
dedup steps, over the rows still kept at that point (every per-row stage and filter passed: DataComp's "pool after
basic filtering"); filters with percentiles chain in chain order, each over what the earlier ones kept.

Exact, not estimated: the scores are float32 (Filter stores them so), and a float32 maps to a uint32 key of the same
order, so the k-th smallest score is found by a radix select: pass 1 counts the keys' top 16 bits (65,536 bins), the
bin holding rank k is read off the merged counts, pass 2 counts the low 16 bits of the keys in that bin. Each Ray task
returns only the bins it saw (sparse); the driver holds two 65,536-bin arrays, whatever the row count. The error
bound is therefore 0: the threshold is the exact order statistic of the stored scores (a sort would give the same).

The threshold's rank, with N scored rows (NaN scores are not in the population and pass, as in Filter):
  min_percentile q: the score of rank ceil(N q / 100) from the bottom (0-based); rows >= it are kept, which is the
      top floor(N (100 - q) / 100) rows plus any tied with the threshold (DataComp's get_threshold: the n-th largest
      of n = int(N p) for the top fraction p). q = 100 keeps none.
  max_percentile q: the score of rank floor(N q / 100) - 1; rows <= it are kept (the bottom floor(N q / 100) rows and
      ties). q = 0 keeps none.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

BINS = 1 << 16  # each pass counts 16 bits of the 32-bit key
_SIGN = np.uint32(0x80000000)


def float_keys(scores: np.ndarray) -> np.ndarray:
    """float32 scores (no NaN) -> uint32 keys in the same order (-0.0 counted as 0.0)."""
    u = (np.asarray(scores, dtype=np.float32) + np.float32(0)).view(np.uint32)  # -0.0 + 0.0 is +0.0
    return np.where(u & _SIGN, ~u, u | _SIGN)


def key_value(key: int) -> float:
    """The float32 score of a key (float_keys' inverse), as a Python float."""
    key = np.uint32(key)
    u = key ^ _SIGN if key & _SIGN else ~key
    return float(np.array([u], dtype=np.uint32).view(np.float32)[0])


def target_rank(n: int, percentile: float, side: str) -> int | None:
    """The 0-based rank (ascending) of the threshold among n scores, or None when every row fails (see the module
    doc). Exact rational arithmetic: N q / 100 at N = 2e9 must not round."""
    x = Fraction(n) * Fraction(percentile) / 100
    if side == "min":
        k = math.ceil(x)
        return k if k < n else None
    k = math.floor(x) - 1
    return k if k >= 0 else None


def exact_threshold(scores: np.ndarray, percentile: float, side: str) -> float | None:
    """The threshold over an in-memory array of scores, with the same definition (for tests and small inputs)."""
    s = np.sort(np.asarray(scores, dtype=np.float32)[~np.isnan(scores)])
    k = target_rank(len(s), percentile, side)
    return None if k is None else float(s[k] + np.float32(0))


def _hist(batch: dict[str, np.ndarray], column: str, top: int | None) -> dict[str, np.ndarray]:
    """Ray task: the sparse counts of one 16-bit digit of the batch's score keys: the top digit (top None), or the
    low digit of the keys whose top digit is `top`."""
    s = np.asarray(batch.get(column, ()), dtype=np.float32)  # (an empty block may have no columns)
    keys = float_keys(s[~np.isnan(s)])
    if top is None:
        digit = keys >> np.uint32(16)
    else:
        digit = keys[(keys >> np.uint32(16)) == top] & np.uint32(0xFFFF)
    bins, counts = np.unique(digit, return_counts=True)
    return {"bin": bins.astype(np.int64), "count": counts.astype(np.int64)}


def _merged(ds: ray.data.Dataset, column: str, top: int | None) -> np.ndarray:
    """The dense 65,536-bin counts of a digit over the whole dataset (the driver holds only these)."""
    total = np.zeros(BINS, dtype=np.int64)
    fn = functools.partial(_hist, column=column, top=top)
    for b in ds.map_batches(fn, batch_size=None, batch_format="numpy", num_cpus=0.25).iter_batches(batch_size=None):
        if len(b.get("bin", ())):
            np.add.at(total, b["bin"], b["count"])
    return total


def select(ds: ray.data.Dataset, column: str, percentile: float, side: str) -> tuple[int, float | None, int]:
    """-> (population: rows with a non-NaN score, the exact threshold or None when every row fails, the rows of the
    population that fail it: below a min threshold, above a max one)."""
    hi = _merged(ds, column, None)
    n = int(hi.sum())
    k = target_rank(n, percentile, side)
    if k is None:
        return n, None, n
    before = np.r_[0, np.cumsum(hi)]  # before[b]: keys whose top digit is < b
    top = int(np.searchsorted(before, k, side="right")) - 1  # the bin holding rank k
    lo = np.r_[0, np.cumsum(_merged(ds, column, top))]
    low = int(np.searchsorted(lo, k - before[top], side="right")) - 1
    below = int(before[top] + lo[low])  # keys < the threshold's
    above = n - int(before[top] + lo[low + 1])  # keys > the threshold's
    return n, key_value((top << 16) | low), below if side == "min" else above


def _split(batch: dict[str, np.ndarray], column: str, side: str, value: float | None, reason: str | None) -> dict:
    """Ray task: the rows that pass (reason None) or the marks (pos, reason) of those that fail."""
    if column not in batch:  # an empty block without columns
        return batch if reason is None else {"pos": np.zeros(0, np.int64), "reason": np.zeros(0, dtype=object)}
    s = np.asarray(batch[column], dtype=np.float32)
    if value is None:
        failed = ~np.isnan(s)
    else:
        failed = (s < np.float32(value)) if side == "min" else (s > np.float32(value))
    if reason is None:
        return {k: v[~failed] for k, v in batch.items()}
    return {"pos": batch["pos"][failed], "reason": np.full(int(failed.sum()), reason, dtype=object)}


@dataclass
class PercentileThreshold:
    """A corpus-wide step (split.finalize runs it like a dedup step, before them): rows below the percentile
    threshold of filter `name`'s score get drop_reason `name`. After apply, `result` holds what index.json records:
    filter, side and percentile, the threshold (null when N is 0 or every row fails), population and rows dropped."""

    name: str  # the filter: its score column and its drop_reason
    side: str  # "min" (keep the top) | "max" (keep the bottom)
    percentile: float
    result: dict[str, Any] = field(default_factory=dict)
    added: dict[str, str] = field(default_factory=dict)  # no score-store columns of its own

    def __post_init__(self) -> None:
        self.result = self._result(0, None, 0)

    @property
    def column(self) -> str:
        return self.name

    def _result(self, n: int, value: float | None, dropped: int) -> dict[str, Any]:
        return {
            "filter": self.name,
            f"{self.side}_percentile": self.percentile,
            "threshold": value,
            "population": n,
            "dropped": dropped,
        }

    def candidates(self, t: pa.Table, prefix: str) -> dict[str, np.ndarray]:
        if not t.num_rows:
            return {f"{prefix}score": np.zeros(0, dtype=np.float32)}
        return {f"{prefix}score": t[self.column].to_numpy(zero_copy_only=False).astype(np.float32)}

    def apply(self, ds: ray.data.Dataset, prefix: str, n: int, keys: Any) -> tuple:
        """-> (the candidates still kept, marks (pos, reason)); two histogram passes, then one marking pass."""
        col = f"{prefix}score"
        population, value, dropped = select(ds, col, self.percentile, self.side)
        self.result = self._result(population, value, dropped)
        kw = {"column": col, "side": self.side, "value": value}
        marks = ds.map_batches(_split, fn_kwargs={**kw, "reason": self.name}, batch_format="numpy")
        kept = ds.map_batches(_split, fn_kwargs={**kw, "reason": None}, batch_format="numpy")
        return kept, marks


def percentile_steps(filters: Any) -> list[PercentileThreshold]:
    """The steps of a resolved chain (FilterConfigs or their dicts, as index.json's config holds them), in chain
    order; a filter with both percentiles gets its min step, then its max step."""
    steps = []
    for c in filters or ():
        get = c.get if isinstance(c, dict) else functools.partial(getattr, c)
        for side in ("min", "max"):
            q = get(f"{side}_percentile", None)
            if q is not None:
                steps.append(PercentileThreshold(get("name"), side, float(q)))
    return steps
