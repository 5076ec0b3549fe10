"""The stage protocol: a map_batches callable over columnar numpy batches, and how it is applied on Ray."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class Resources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    concurrency: int | tuple[int, int] = 1  # actor pool: fixed n or (min, max)
    batch_size: int = 256


class Stage(Protocol):
    """A map_batches callable. __init__ runs once per actor, so load models there."""

    resources: ClassVar[Resources]

    def __init__(self, cfg: Any) -> None: ...

    def __call__(self, batch: Batch) -> Batch: ...


def apply(ds: Any, stage: type, cfg: Any, resources: Resources | None = None) -> Any:
    """ds.map_batches(stage) on an actor pool sized by `resources` (default: the stage's own)."""
    r = resources or stage.resources
    return ds.map_batches(
        stage,
        fn_constructor_kwargs={"cfg": cfg},
        batch_size=r.batch_size,
        batch_format="numpy",
        num_cpus=r.num_cpus,
        num_gpus=r.num_gpus or None,
        concurrency=r.concurrency,
        zero_copy_batch=False,
    )
