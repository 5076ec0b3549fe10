"""The built wheel works outside the checkout: presets, run configs and the example manifest ship as package data,
and `mm1data demo` runs from a fresh venv in another directory."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("filters", "pipelines", "manifests")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the source tree (a build in the checkout would leave build/ behind, whose
    stale files a later build could pick up)."""
    tmp = tmp_path_factory.mktemp("wheel")
    skip = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "*_out", ".*cache")
    shutil.copytree(REPO, tmp / "src", ignore=skip)
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist")]
    subprocess.run([*build, str(tmp / "src")], check=True, timeout=300)
    return next((tmp / "dist").glob("mm1data-*.whl"))


def test_wheel_carries_every_preset(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = [f"mm1data/_data/{d}/{p.name}" for d in FOLDERS for p in (REPO / d).glob("*.yaml")]
    assert len(shipped) >= 7 and set(shipped) <= names
    assert "mm1data/scorers/model_configs/mm1data-tiny-clip.json" in names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)


@pytest.mark.slow
def test_installed_wheel_runs_the_demo_elsewhere(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    purelib = subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    # The dependencies without downloading torch again: this interpreter's site-packages as a plain path line (a
    # path line loads none of that folder's .pth files, so its editable mm1data stays out).
    Path(purelib.decode().strip(), "_mm1data_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index"]
    subprocess.run([*pip, str(wheel)], check=True, timeout=300)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | {"HF_HUB_OFFLINE": "1"}
    mm1data = str(venv / "bin" / "mm1data")

    def run(*args: str, timeout: int = 120) -> str:
        p = subprocess.run(args, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=timeout)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return p.stdout + p.stderr

    where = run(python, "-c", "import mm1data.presets as p; print(p.__file__, p.folder('filters'))")
    assert where.startswith(str(venv)) and "_data" in where  # the wheel's copy, not the checkout
    assert "- name: caption_words" in run(mm1data, "config", "show", "caption", "--set", "filters=caption_datacomp")
    assert "text_gopher" in run(mm1data, "run", "--help")
    out = run(mm1data, "demo", "--out", "demo", "--rows", "60", "--steps", "2", timeout=600)
    for page in ("report-manifest.html", "caption/report.html", "text/report.html", "train/metrics.jsonl"):
        assert (elsewhere / "demo" / page).is_file(), page
    assert "all present with their listed sizes" in out and "Open:" in out
    # quiet by default: mm1data's progress (rows of the total) and stage summary, none of Ray Data's block counts
    assert re.search(r"caption: read, per-row stages, staging: (\d+)/\1 rows \(100%\)", out)
    assert "stage summary" in out and "dedup, decide" in out
    assert "Running Dataset" not in out and "logging_progress" not in out and "Started a local Ray" not in out
