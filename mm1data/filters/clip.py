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
        return batch["clip_score"]

    def __call__(self, batch: Batch) -> Batch:
        s = batch["clip_score"]  # the column is the scorer's; this filter only thresholds it
        failed = ((s < self.min) | (s > self.max)) & (batch["drop_reason"] == "")
        batch["drop_reason"] = np.where(failed, self.name, batch["drop_reason"]).astype(object)
        return batch
