"""Exact deduplication over the whole run: deterministic, the first copy in input order is kept."""

from __future__ import annotations

import numpy as np


def mark_duplicates(values: np.ndarray, drop_reason: np.ndarray, reason: str) -> np.ndarray:
    """Rows (already in input order) whose value repeats an earlier kept row's get drop_reason = reason.

    Only kept rows take part: a copy dropped by a filter never knocks out a kept one. Empty values are ignored.
    """
    kept = np.flatnonzero((drop_reason == "") & (values != ""))
    _, first = np.unique(values[kept], return_index=True)  # index of the first occurrence among kept rows
    dup = np.ones(len(kept), dtype=bool)
    dup[first] = False
    out = drop_reason.copy()
    out[kept[dup]] = reason
    return out
