"""The batch every stage takes and returns: a map_batches callable over columnar numpy arrays."""

from __future__ import annotations

import numpy as np

Batch = dict[str, np.ndarray]  # column name -> one value per row; strings and bytes as object arrays


def plain_lists(batch: Batch) -> Batch:
    """List columns as arrays of Python lists. Ray Data hands list columns to a stage as arrays of numpy arrays,
    which it cannot turn back into Arrow when they are ragged (it falls back to pickling the column, with a warning
    per block), or as one 2-D array when every list of the batch has the same length; lists convert as they came."""
    for name, values in batch.items():
        if values.ndim == 2:  # a list column whose lists all have one length in this batch
            out = np.empty(len(values), dtype=object)
            out[:] = values.tolist()
            batch[name] = out
        elif values.dtype == object and len(values) and any(isinstance(v, np.ndarray) for v in values):
            out = np.empty(len(values), dtype=object)
            out[:] = [v.tolist() if isinstance(v, np.ndarray) else v for v in values]
            batch[name] = out
    return batch
