"""Image size filters on the fetched image's original size (NaN where there is no image)."""

from __future__ import annotations

import numpy as np

from mm1data.filters.base import Filter
from mm1data.registry import register_filter
from mm1data.stage import Batch


def _sides(batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    w = batch["orig_width"].astype(np.float32)
    h = batch["orig_height"].astype(np.float32)
    missing = (w <= 0) | (h <= 0)
    w[missing], h[missing] = np.nan, np.nan
    return w, h


@register_filter("image_min_side")
class ImageMinSideFilter(Filter):
    """Shorter side of the original image in px (DataComp basic: >= 200)."""

    def score(self, batch: Batch) -> np.ndarray:
        return np.fmin(*_sides(batch))


@register_filter("image_aspect")
class ImageAspectFilter(Filter):
    """Longer side over shorter side of the original image, >= 1 (DataComp basic: <= 3)."""

    def score(self, batch: Batch) -> np.ndarray:
        w, h = _sides(batch)
        return np.fmax(w, h) / np.fmin(w, h)
