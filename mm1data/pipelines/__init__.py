"""The stage graph of each corpus kind, built from a run config; `run_pipeline` is what `mm1data run` calls."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mm1data.config import ConfigError, apply_overrides, from_dict, parse_override, read_yaml

log = logging.getLogger(__name__)

# kind -> module with Config and run(cfg, search_dirs)
PIPELINES = {"caption": "mm1data.pipelines.caption", "text": "mm1data.pipelines.text"}


def load_run_config(path: str | None, overrides: list[str] = (), kind: str | None = None) -> tuple[Any, Any]:
    """-> (pipeline module, validated config). The kind comes from the YAML's `pipeline` key or the file name."""
    raw = read_yaml(path) if path else {}
    raw = apply_overrides(raw, [parse_override(o) for o in overrides])
    kind = raw.get("pipeline") or kind or (Path(path).stem if path else None)
    if kind not in PIPELINES:
        raise ConfigError(f"unknown pipeline {kind!r} (known: {', '.join(PIPELINES)}); set `pipeline:` in the YAML")
    module = importlib.import_module(PIPELINES[kind])
    raw["pipeline"] = kind
    return module, from_dict(module.Config, raw)


def search_dirs(path: str | None) -> tuple[str, ...]:
    """Where a relative filter chain is looked up: the run config's folder, its parent, and their filters/."""
    if not path:
        return ()
    here = os.path.dirname(os.path.abspath(path))
    parent = os.path.dirname(here)
    return (here, parent, os.path.join(here, "filters"), os.path.join(parent, "filters"))


def init_ray(address: str | None) -> None:
    """Local Ray unless an address is given (`auto`, `ray://...`); reuses a running session."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=True, include_dashboard=False)


def stage_units(
    output: str, units: list, fingerprint: dict[str, Any], address: str | None, build: Callable[[list, dict], Any]
) -> None:
    """The per-row half of every pipeline: refuse a mismatched earlier run, start Ray, then run `build(todo, done)`
    (a Dataset ending in the staging writer) over the units with rows not yet staged; a rerun after a crash
    processes only those."""
    from mm1data.staging import check_run, pending_units, staged_rows

    check_run(output, fingerprint)
    init_ray(address)
    done = staged_rows(output)
    todo = pending_units(units, done)
    log.info("%d units, %d to process (%d staged by an earlier run)", len(units), len(todo), len(units) - len(todo))
    if todo:
        t0 = time.perf_counter()
        staged = sum(int(b["rows"].sum()) for b in build(todo, done).iter_batches(batch_size=None))
        log.info("staged %d rows in %.1fs", staged, time.perf_counter() - t0)


def run_pipeline(
    path: str | None, input_uri: str | None, output: str | None, overrides: list[str] = (), address: str | None = None
) -> dict[str, Any]:
    """Validate everything cheap first (config, filters, input, output), then run on Ray; returns index.json."""
    module, cfg = load_run_config(path, overrides)
    if input_uri:  # flags win over the YAML; taken as strings, not YAML-parsed
        cfg = dataclasses.replace(cfg, input=dataclasses.replace(cfg.input, path=input_uri))
    if output:
        cfg = dataclasses.replace(cfg, output=output)
    if not cfg.output:
        raise ConfigError("no output: pass --output URI (or set output)")
    cfg = dataclasses.replace(cfg, output=cfg.output.rstrip("/"))
    return module.run(cfg, search_dirs(path), address)
