"""Name -> class registries; names are stored in data (score columns, drop_reason) and never renamed."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

FILTERS: dict[str, type] = {}


def register_filter(name: str) -> Callable[[type[T]], type[T]]:
    def wrap(cls: type[T]) -> type[T]:
        if name in FILTERS:
            raise ValueError(f"filter {name!r} registered twice")
        cls.name = name
        FILTERS[name] = cls
        return cls

    return wrap


def get_filter(name: str) -> type:
    import mm1data.filters  # noqa: F401  (registers the built-in filters)

    if name not in FILTERS:
        raise KeyError(f"unknown filter {name!r} (known: {', '.join(sorted(FILTERS))})")
    return FILTERS[name]
