"""Annotate-only filters: each writes its score column and marks failing, still-kept rows with drop_reason."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mm1data import presets
from mm1data.config import ConfigError, read_yaml_any, short
from mm1data.registry import get_filter
from mm1data.stage import Batch, plain_lists


@dataclass(frozen=True)
class FilterConfig:
    name: str  # registry key; also the score column and the drop_reason
    min: float = -np.inf
    max: float = np.inf
    params: dict[str, Any] = field(default_factory=dict)  # filter-specific keys (e.g. lang: languages)
    # corpus-wide thresholds, applied after every per-row stage (mm1data/percentile.py): keep the rows at or above the
    # min_percentile-th percentile of the score (70: the top 30%) / at or below the max_percentile-th; 0 to 100
    min_percentile: float | None = None
    max_percentile: float | None = None

    def per_row(self) -> dict[str, Any]:
        """What the per-row half depends on (the run's fingerprint): percentiles are decided later, from staging."""
        return {"name": self.name, "min": self.min, "max": self.max, "params": self.params}


class Filter:
    """Sets batch[name] = score; marks failing, still-kept rows with drop_reason = name. NaN scores pass."""

    name: ClassVar[str]
    params: ClassVar[dict[str, Any]] = {}  # accepted extra keys and their defaults
    needs: ClassVar[tuple[str, ...]] = ()  # columns that a scorer must have added first (e.g. clip_score)
    late: ClassVar[bool] = False  # applied after every scorer stage (interleaved doc_images: scorers remove images)
    scalar: ClassVar[bool] = True  # one score per row (False: a list per position, which no percentile applies to)

    def __init__(self, cfg: FilterConfig) -> None:
        self.min, self.max = cfg.min, cfg.max
        self.p = {**self.params, **cfg.params}

    def score(self, batch: Batch) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, batch: Batch) -> Batch:
        batch[self.name] = s = np.asarray(self.score(batch), dtype=np.float32)
        failed = ((s < self.min) | (s > self.max)) & (batch["drop_reason"] == "")
        batch["drop_reason"] = np.where(failed, self.name, batch["drop_reason"]).astype(object)
        return batch


class FilterChain:
    """Applies an ordered list of filters to each batch (one map_batches stage; models load once per actor)."""

    def __init__(self, cfg: tuple[FilterConfig, ...]) -> None:
        self.filters = [get_filter(c.name)(c) for c in cfg]

    def __call__(self, batch: Batch) -> Batch:
        for f in self.filters:
            batch = f(batch)
        return batch


_CHAINS: dict[str, FilterChain] = {}


def cached_chain(cfg: tuple[FilterConfig, ...]) -> FilterChain:
    """The FilterChain of `cfg`, built once per worker process (lang loads its model once, not per task)."""
    key = repr(cfg)
    if key not in _CHAINS:
        _CHAINS[key] = FilterChain(cfg)
    return _CHAINS[key]


def apply_chain(batch: Batch, cfg: tuple[FilterConfig, ...]) -> Batch:
    """FilterChain as a plain Ray task: no actor holds CPUs while idle; models are cached per worker process."""
    return plain_lists(cached_chain(cfg)(batch))


def parse_chain(spec: str | tuple | list, search_dirs: tuple[str, ...] = ()) -> tuple[FilterConfig, ...]:
    """A chain file's path (or preset name in filters/) or an inline list of {name, min, max, ...} -> configs."""
    where = "filters"
    if isinstance(spec, str):
        path = _find_chain(spec, search_dirs)
        where = str(path)
        spec = read_yaml_any(path) or []
        if isinstance(spec, dict):
            spec = spec.get("filters", [])
    if not isinstance(spec, (list, tuple)):
        raise ConfigError(f"{where}: expected a list of filters")
    out = []
    for i, entry in enumerate(spec):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"{where}[{i}]: each filter needs a 'name'")
        entry = dict(entry)
        name = entry.pop("name")
        if not isinstance(name, str):
            raise ConfigError(f"{where}[{i}]: a filter name must be a string, got {short(name)}")
        try:
            cls = get_filter(name)
        except KeyError as e:
            raise ConfigError(f"{where}[{i}]: {short(e.args[0], 300)}") from None
        lo, hi = entry.pop("min", -np.inf), entry.pop("max", np.inf)
        for key, bound in (("min", lo), ("max", hi)):  # a NaN or text threshold would pass every row silently
            if isinstance(bound, bool) or not isinstance(bound, (int, float)) or math.isnan(bound):
                raise ConfigError(f"{where}[{i}] ({name}): {key} must be a number, got {short(bound)}")
        if lo > hi:
            raise ConfigError(f"{where}[{i}] ({name}): min {lo} is above max {hi}: every row would fail")
        pct = {k: entry.pop(k) for k in ("min_percentile", "max_percentile") if entry.get(k) is not None}
        for key, q in pct.items():
            if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 <= q <= 100:
                raise ConfigError(f"{where}[{i}] ({name}): {key} must be a number from 0 to 100, got {short(q)}")
            if not cls.scalar:
                raise ConfigError(f"{where}[{i}] ({name}): {key}: a position-level filter has no score per row")
        entry.pop("min_percentile", None), entry.pop("max_percentile", None)
        unknown = sorted(set(entry) - set(cls.params), key=str)
        if unknown:
            raise ConfigError(
                f"{where}[{i}] ({name}): unknown key {short(unknown[0])} (known: min, max, min_percentile, "
                f"max_percentile, {', '.join(sorted(cls.params)) or '-'})"
            )
        pct = {k: float(v) for k, v in pct.items()}
        out.append(FilterConfig(name, float(lo), float(hi), entry, **pct))
    return tuple(out)


def _find_chain(spec: str, search_dirs: tuple[str, ...]) -> Path:
    candidates = [Path(spec)] + [Path(d) / spec for d in search_dirs]
    if not spec.endswith((".yaml", ".yml")):
        # the presets shipped with the package (the checkout's filters/ or the wheel's copy), from any directory
        candidates += [Path(d) / f"{spec}.yaml" for d in ("filters", *search_dirs, presets.folder("filters"))]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"filter chain not found: {spec!r} (looked in: {', '.join(str(c) for c in candidates)})")
