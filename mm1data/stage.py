"""The batch every stage takes and returns: a map_batches callable over columnar numpy arrays."""

from __future__ import annotations

import numpy as np

Batch = dict[str, np.ndarray]  # column name -> one value per row; strings and bytes as object arrays
