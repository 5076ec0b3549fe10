"""CLIP score threshold: a cheap filter on the clip_score column that ClipScorer adds (re-threshold, no re-score)."""

from __future__ import annotations

import numpy as np

from mm1data.filters.base import Filter
from mm1data.registry import register_filter
from mm1data.stage import Batch


@register_filter("clip_score")
class ClipScoreFilter(Filter):
    """Cosine similarity of image and caption embeddings (LAION-2B-en: ViT-B/32 >= 0.28)."""

    needs = ("clip_score",)

    def score(self, batch: Batch) -> np.ndarray:
        return batch["clip_score"]  # the scorer's column; this filter only thresholds it
