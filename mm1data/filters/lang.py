"""Language id filter (fasttext lid.176)."""

from __future__ import annotations

import numpy as np

from mm1data.filters.base import Filter, FilterConfig
from mm1data.registry import register_filter
from mm1data.scorers.lang import LangScorer
from mm1data.stage import Batch


@register_filter("lang")
class LangFilter(Filter):
    """Probability that the text is in one of `languages` (sum over lid.176's top 5); also adds lang_id (top 1).

    With `top1: true` (default) a row also fails when its most likely language is not allowed (DataComp's
    "fasttext language = English"); `min` adds a confidence floor (OBELICS: 0.8).
    """

    params = {"languages": ["en"], "column": "caption", "model": None, "top1": True}

    def __init__(self, cfg: FilterConfig) -> None:
        super().__init__(cfg)
        self.languages = set(self.p["languages"])
        self.scorer = LangScorer(self.p["model"])

    def score(self, batch: Batch) -> np.ndarray:
        labels, probs = self.scorer.predict([str(t) for t in batch[self.p["column"]]], k=5)
        batch["lang_id"] = np.array([lab[0] if lab else "" for lab in labels], dtype=object)
        return np.array([sum(p for lab, p in zip(ls, ps) if lab in self.languages) for ls, ps in zip(labels, probs)])

    def __call__(self, batch: Batch) -> Batch:
        batch = super().__call__(batch)
        if self.p["top1"]:
            failed = ~np.isin(batch["lang_id"], list(self.languages)) & (batch["drop_reason"] == "")
            batch["drop_reason"] = np.where(failed, self.name, batch["drop_reason"]).astype(object)
        return batch
