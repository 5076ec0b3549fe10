"""The corpus kinds (one module each, a Kind declaration) and `run_pipeline`, what `mm1data run` calls."""

from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path
from typing import Any

from mm1data import presets
from mm1data.config import ConfigError, apply_overrides, from_dict, parse_override, read_yaml

# kind -> module holding KIND (a runner.Kind) and its Config
PIPELINES = {
    "caption": "mm1data.pipelines.caption",
    "interleaved": "mm1data.pipelines.interleaved",
    "text": "mm1data.pipelines.text",
}


def load_run_config(path: str | None, overrides: list[str] = (), kind: str | None = None) -> tuple[Any, Any]:
    """-> (the kind's Kind, validated config). The kind comes from the YAML's `pipeline` key or the file name.
    A bare name that is no file (`caption`, `text.yaml`) is the run config shipped in pipelines/."""
    path = resolve_run_config(path)
    raw = read_yaml(path) if path else {}
    raw = apply_overrides(raw, [parse_override(o) for o in overrides])
    kind = raw.get("pipeline") or kind or (Path(path).stem if path else None)
    if kind not in PIPELINES:
        raise ConfigError(f"unknown pipeline {kind!r} (known: {', '.join(PIPELINES)}); set `pipeline:` in the YAML")
    declared = importlib.import_module(PIPELINES[kind]).KIND
    raw["pipeline"] = kind
    return declared, from_dict(declared.config, declared.upgrade(raw))


def resolve_run_config(path: str | None) -> str | None:
    """`path` itself when it is a file; else the shipped pipelines/ config of that bare name, if any."""
    if not path or os.path.isfile(path):
        return path
    shipped = presets.find("pipelines", path)
    return str(shipped) if shipped else path


def search_dirs(path: str | None) -> tuple[str, ...]:
    """Where a relative filter chain is looked up: the run config's folder, its parent, and their filters/."""
    if not path:
        return ()
    here = os.path.dirname(os.path.abspath(path))
    parent = os.path.dirname(here)
    return (here, parent, os.path.join(here, "filters"), os.path.join(parent, "filters"))


def run_pipeline(
    path: str | None, input_uri: str | None, output: str | None, overrides: list[str] = (), address: str | None = None
) -> dict[str, Any]:
    """Validate everything cheap first (config, filters, input, output), then run on Ray; returns index.json.

    Without `address` the job starts a local Ray of its own; local paths are made absolute before any task sees them.
    """
    from mm1data.pipelines.runner import absolute, run

    path = resolve_run_config(path)
    kind, cfg = load_run_config(path, overrides)
    if input_uri:  # flags win over the YAML; taken as strings, not YAML-parsed
        cfg = dataclasses.replace(cfg, input=dataclasses.replace(cfg.input, path=input_uri))
    if output:
        cfg = dataclasses.replace(cfg, output=output)
    if not cfg.output:
        raise ConfigError("no output: pass --output URI (or set output)")
    cfg = dataclasses.replace(
        cfg,
        output=absolute(cfg.output.rstrip("/")),
        input=dataclasses.replace(cfg.input, path=absolute(cfg.input.path)),
    )
    if getattr(getattr(cfg, "dedup", None), "reference", ()):  # dedup.reference locations, read by Ray tasks
        reference = tuple(absolute(r.rstrip("/")) for r in cfg.dedup.reference)
        cfg = dataclasses.replace(cfg, dedup=dataclasses.replace(cfg.dedup, reference=reference))
    return run(kind, cfg, search_dirs(path), address)


def show_config(path: str, overrides: list[str] = ()) -> str:
    """The resolved run config as YAML that `mm1data run` takes back: the file, the --set overrides and every
    default, with the filter chain inline as it would run (`mm1data config show`)."""
    import math

    import yaml

    from mm1data.config import to_dict
    from mm1data.filters import parse_chain

    path = resolve_run_config(path)
    kind, cfg = load_run_config(path, overrides)
    chain = [
        {
            "name": c.name,
            **{k: v for k, v in (("min", c.min), ("max", c.max)) if math.isfinite(v)},
            **{k: v for k, v in (("min_percentile", c.min_percentile), ("max_percentile", c.max_percentile)) if v},
            **c.params,
        }
        for c in parse_chain(cfg.filters, search_dirs(path))
    ]
    spec = cfg.filters if isinstance(cfg.filters, str) else "an inline list"
    head = f"# {kind.name} run config: {path or 'defaults'}" + (f" + {len(overrides)} --set" if overrides else "")
    body = yaml.safe_dump({**to_dict(cfg), "filters": to_dict(chain)}, sort_keys=False, width=110)
    return f"{head}\n# filters: {spec}, resolved below\n{body}"
