#!/usr/bin/env bash
# Wheels the GPU check (tools/gpu_check.sh) installs on the GPU image, which has Python 3.12, torch,
# triton and transformers (with their requirements) and no package index. Run once on a machine with
# an index; .whl/ is git-ignored and travels with the device call (`carry: [".whl"]`).
# tools/gpu_check_imports.py reads the NAME==VERSION pins below: keep one pin per wheel here.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=(
  megatron-core==0.19.2   # the Megatron backend on the image's Python 3.12, what [megatron] resolves to there
                          # (its numpy / packaging come with transformers, triton is on the image)
  pytest==9.2.0           # the GPU tests; pytest's own requirements follow
  pluggy==1.7.0
  iniconfig==2.3.1
  pygments==2.21.0
  pillow==13.0.0          # images in the rollout GPU tests and the HF engine's image processor
  math-verify==0.9.0      # the verifier of tools/gpu_rl_step.py's RL step, with its two requirements
  latex2sympy2_extended==1.11.0
  antlr4-python3-runtime==4.13.2
)
# An image on Python 3.11 gets megatron-core 0.16.1, the newest release for 3.11 (as [megatron] there);
# tools/gpu_check.sh installs the one that matches the image's Python.
MEGATRON_CORE_PY311=megatron-core==0.16.1
mkdir -p .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform any -d .whl "${WHEELS[@]}"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 --implementation cp \
  --platform manylinux_2_28_x86_64 -d .whl "$MEGATRON_CORE_PY311"
du -ch .whl/*.whl | tail -n 1
