# One venv, pinned torch (constraints.txt): `make demo` runs the main job, `make test` the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
export HF_HUB_OFFLINE ?= 1

.PHONY: install browser demo test bench lint gpu-kit

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Debian's Chromium for the report's page test (tests/test_report.py skips its browser checks without it)
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
		echo "chromium could not be installed: the report's browser tests will be skipped"

demo: install
	$(VENV)/bin/mm1data demo --out demo_out

test: install browser
	$(PY) -m pytest -q

bench: install
	$(PIP) -e '.[test,bench]'
	$(PY) bench/download.py
	$(PY) bench/minhash.py
	$(PY) bench/loader.py
	$(PY) bench/fidelity.py
	$(PY) bench/text.py
	$(PY) bench/scale.py
	$(PY) bench/interleaved.py
	$(PY) bench/recaption.py

lint: install
	$(VENV)/bin/ruff check mm1data tests bench

# The wheels bench/gpu_check.sh installs on a device machine (no network there; see that script): open_clip and
# ftfy at this venv's versions, built for the device's x86-64 Python 3.12 (its own torch stays)
gpu-kit: install
	rm -rf .gpu_kit
	$(PY) -m pip download -q --no-deps --only-binary=:all: -d .gpu_kit \
		--platform manylinux2014_x86_64 --python-version 3.12 --implementation cp \
		$$($(PY) -m pip freeze | grep -iE '^(open[-_]clip[-_]torch|ftfy|wcwidth)==')
