#!/bin/sh
# Issue 15's GPU check in one call on a bare device machine, which has torch, torchvision, timm and pytest but no
# network and no open_clip: `make gpu-kit` here downloads open_clip's pure-Python wheels (and ftfy's) into .gpu_kit/
# (git-ignored), then the device tool's run, with carry [".gpu_kit"]:
#
#     sh bench/gpu_check.sh            # figures in $OUT/gpu_clip.txt
#
# It runs the CUDA tests (nvJPEG decode against open_clip's PIL transform) and bench/gpu_clip.py without Ray (Ray's
# wheel is over the 64 MiB a run carries): the bare forward against the whole CLIP stage, goal >= 0.8x.
set -eu
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT" /tmp/gpu_kit
ls .gpu_kit/*.whl >/dev/null || { echo "no .gpu_kit/*.whl: run 'make gpu-kit' first and carry .gpu_kit" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --target /tmp/gpu_kit .gpu_kit/*.whl
export PYTHONPATH="/tmp/gpu_kit:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, torchvision, open_clip; print('torch', torch.__version__, 'torchvision', \
torchvision.__version__, 'open_clip', open_clip.__version__, 'CPUs', len(__import__('os').sched_getaffinity(0)))"
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_clip.py 2>&1 | tail -n 15
  python3 bench/gpu_clip.py --no-ray "$@" 2>&1
} | tee "$OUT/gpu_clip.txt"
