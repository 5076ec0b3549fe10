"""Caption text filters."""

from __future__ import annotations

import numpy as np

from mm1data.filters.base import Filter
from mm1data.registry import register_filter
from mm1data.stage import Batch


@register_filter("caption_words")
class CaptionWordsFilter(Filter):
    """Whitespace-separated words in the caption."""

    def score(self, batch: Batch) -> np.ndarray:
        return np.array([len(str(c).split()) for c in batch["caption"]])


@register_filter("caption_chars")
class CaptionCharsFilter(Filter):
    """Characters in the caption, surrounding whitespace excluded."""

    def score(self, batch: Batch) -> np.ndarray:
        return np.array([len(str(c).strip()) for c in batch["caption"]])
