"""Where the shipped YAML lives: filter chains (filters/), run configs (pipelines/) and manifests (manifests/).

In a checkout they are the top-level folders (the source of truth, which users edit). A wheel carries copies of
every *.yaml in them under mm1data/_data/ (setup.py copies them at build time), so a preset is found from any
working directory whether mm1data runs from a checkout or from an installed wheel.
"""

from __future__ import annotations

from pathlib import Path

FOLDERS = ("filters", "pipelines", "manifests")
_PACKAGE = Path(__file__).resolve().parent


def folder(name: str) -> Path:
    """The folder holding the shipped `name` YAML files (one of FOLDERS): the wheel's copy, else the checkout's."""
    if name not in FOLDERS:
        raise ValueError(f"unknown preset folder {name!r} (known: {', '.join(FOLDERS)})")
    shipped = _PACKAGE / "_data" / name
    return shipped if shipped.is_dir() else _PACKAGE.parent / name


def names(kind: str) -> list[str]:
    """The preset names in a folder (file stems), sorted."""
    return sorted(p.stem for p in folder(kind).glob("*.yaml"))


def find(kind: str, spec: str) -> Path | None:
    """A shipped file by bare name (`caption_laion` or `caption_laion.yaml`), or None."""
    if "/" in spec or "\\" in spec:
        return None
    path = folder(kind) / (spec if spec.endswith((".yaml", ".yml")) else f"{spec}.yaml")
    return path if path.is_file() else None
