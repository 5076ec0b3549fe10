"""Build hook: the top-level filters/, pipelines/ and manifests/ folders (the source of truth in a checkout) ship in
the wheel as mm1data/_data/<folder>/*.yaml, every file there, so a preset added later ships without editing
pyproject.toml (package-data patterns cannot reach folders outside the package)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

FOLDERS = ("filters", "pipelines", "manifests")  # mm1data/presets.py looks for them under mm1data/_data/


class BuildPyWithPresets(build_py):
    def run(self) -> None:
        super().run()
        here = Path(__file__).resolve().parent
        for name in FOLDERS:
            dest = Path(self.build_lib) / "mm1data" / "_data" / name
            dest.mkdir(parents=True, exist_ok=True)
            for src in sorted((here / name).glob("*.yaml")):
                shutil.copyfile(src, dest / src.name)


setup(cmdclass={"build_py": BuildPyWithPresets})
