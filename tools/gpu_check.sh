#!/usr/bin/env bash
# Every GPU check and benchmark of care_megatron in one device call, budgeted to finish within
# 8 minutes including the wheel install (GPU_CHECK_BUDGET_S, default 450 s for the steps).
#
# The GPU image has Python 3.12, torch, triton and transformers (with their requirements) and no
# package index. Everything else travels as wheels in the git-ignored .whl/ folder:
#   bash tools/fetch_gpu_wheels.sh                # once, on a machine with an index (~18 MiB)
#   bash tools/gpu_check.sh --dry-run             # on CPU: commands, files, imports on the image
# then run `bash tools/gpu_check.sh` on the GPU with `.whl` carried. Steps run most important first;
# each writes its log to $OUT/<step>.log while it runs and its result line to $OUT/summary.txt as
# soon as it finishes, so a call cut short still returns what it measured.
set -u
cd "$(dirname "$0")/.."
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; elif [ $# -gt 0 ]; then echo "usage: $0 [--dry-run]" >&2; exit 2; fi
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu_check_out}
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
STARTUP_ALLOWANCE_S=30   # wheel install + nvidia-smi + the version line, measured well under this
MIN_STEP_S=15            # a step with less time left than this is skipped, not started

# The GPU tests by file: collecting the whole tests/ tree would import CPU-only test modules
# (pyarrow, imagehash, DALI) that the image lacks, and one failed import aborts every GPU test.
MEGATRON_TESTS=(tests/training/megatron/test_megatron_gpu.py)
KERNEL_TESTS=(tests/kernels/test_kernels_gpu.py tests/kernels/test_graphs.py tests/kernels/test_fused_loss_in_train_step.py)
ROLLOUT_TESTS=(tests/rollout/test_hf_engine.py tests/rollout/test_train_rollout_consistency.py)
PYTEST=("$PYTHON" -m pytest -q -rA -m gpu -p no:cacheprovider)
# megatron-core as [megatron] resolves it for the image's Python; tools/fetch_gpu_wheels.sh fetches both.
MEGATRON_CORE_PY312=0.19.2   # Python >= 3.12 (the image)
MEGATRON_CORE_PY311=0.16.1   # the newest release for Python 3.11
MEGATRON_CORE=$("$PYTHON" -c "import sys; print('$MEGATRON_CORE_PY312' if sys.version_info >= (3, 12) else '$MEGATRON_CORE_PY311')")
# every wheel but the other megatron-core (pip refuses a wheel built for another Python)
shipped_wheels() { ls .whl/*.whl 2>/dev/null | grep -v '/megatron_core-' ; ls .whl/megatron_core-"$MEGATRON_CORE"-*.whl 2>/dev/null; }

# name | time limit (s) | command; most important first
STEPS=(
  "gpu_tests_megatron|100|${PYTEST[*]} ${MEGATRON_TESTS[*]}"
  "bench_train|110|$PYTHON tools/bench_train.py --json $OUT/bench_train.json"
  "rl_step_3b|90|$PYTHON tools/gpu_rl_step.py --json $OUT/rl_step_3b.json"
  "gpu_tests_kernels|45|${PYTEST[*]} ${KERNEL_TESTS[*]}"
  "gpu_tests_rollout|35|${PYTEST[*]} ${ROLLOUT_TESTS[*]}"
  "bench_kernels|30|$PYTHON tools/bench_kernels.py"
  "bench_advantages|20|$PYTHON tools/bench_advantages.py --device cuda --skip-loop"
  "bench_weight_sync|20|$PYTHON tools/bench_weight_sync.py --device cuda --dtype bfloat16"
)
PYTHON_FILES=("${MEGATRON_TESTS[@]}" "${KERNEL_TESTS[@]}" "${ROLLOUT_TESTS[@]}" tools/bench_train.py tools/gpu_rl_step.py
              tools/bench_kernels.py tools/bench_advantages.py tools/bench_weight_sync.py)

if [ "$DRY_RUN" = 1 ]; then
  status=0
  total=$STARTUP_ALLOWANCE_S
  echo "install: $PYTHON -m pip install -q --no-index --no-deps --no-compile --target /tmp/site" \
       ".whl/*.whl less the megatron-core wheel of the other Python"
  echo "megatron-core: $MEGATRON_CORE_PY312 on Python >= 3.12, $MEGATRON_CORE_PY311 below (this Python: $MEGATRON_CORE)"
  for version in "$MEGATRON_CORE_PY312" "$MEGATRON_CORE_PY311"; do
    if ! grep -q "megatron-core==$version\b" tools/fetch_gpu_wheels.sh; then
      echo "tools/fetch_gpu_wheels.sh does not fetch megatron-core $version"; status=1
    fi
  done
  for entry in "${STEPS[@]}"; do
    IFS='|' read -r name limit command <<<"$entry"
    echo "step $name (<= ${limit}s): $command"
    total=$((total + limit))
  done
  for file in "${PYTHON_FILES[@]}" tools/fetch_gpu_wheels.sh tools/gpu_check_imports.py; do
    if [ ! -f "$file" ]; then echo "MISSING FILE: $file"; status=1; fi
  done
  if [ "$BUDGET_S" -gt 450 ] || [ "$total" -gt $((BUDGET_S + STARTUP_ALLOWANCE_S)) ]; then
    echo "step limits + start-up add up to ${total}s, over the ${BUDGET_S}s + ${STARTUP_ALLOWANCE_S}s budget"; status=1
  else
    echo "step limits + start-up: ${total}s (each step is also cut to the time left of ${BUDGET_S}s)"
  fi
  if [ "$status" = 0 ]; then
    PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} "$PYTHON" tools/gpu_check_imports.py --wheels tools/fetch_gpu_wheels.sh \
      "${PYTHON_FILES[@]}" || status=1
  fi
  echo "dry run: $([ "$status" = 0 ] && echo OK || echo FAILED)"
  exit "$status"
fi

START=$SECONDS
mkdir -p "$OUT"
: >"$OUT/summary.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false
if ls .whl/megatron_core-"$MEGATRON_CORE"-*.whl >/dev/null 2>&1; then
  # shellcheck disable=SC2046  # wheel paths have no spaces
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $(shipped_wheels) \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
else
  echo "no .whl/megatron_core-$MEGATRON_CORE-*.whl: run tools/fetch_gpu_wheels.sh and carry .whl" \
       "(megatron-core and pytest are not on the image)"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PYTHON" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
"$PYTHON" -c "from megatron.core.package_info import __version__; print('megatron-core', __version__)" | tee -a "$OUT/gpu.txt"
echo "start-up: $((SECONDS - START))s" | tee -a "$OUT/summary.txt"

DEADLINE=$((SECONDS + BUDGET_S))
for entry in "${STEPS[@]}"; do
  IFS='|' read -r name limit command <<<"$entry"
  left=$((DEADLINE - SECONDS))
  if [ "$left" -lt "$MIN_STEP_S" ]; then
    printf '%-20s skipped: %ss of the budget left\n' "$name" "$left" | tee -a "$OUT/summary.txt"
    continue
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (<= ${limit}s): $command"
  t0=$SECONDS
  # shellcheck disable=SC2086  # the command is a plain word list
  timeout "$limit" $command >"$OUT/$name.log" 2>&1
  rc=$?
  tail -n 25 "$OUT/$name.log"
  verdict=$([ "$rc" = 0 ] && echo ok || { [ "$rc" = 124 ] && echo "TIMEOUT" || echo FAILED; })
  printf '%-20s %-8s rc=%s %ss\n' "$name" "$verdict" "$rc" "$((SECONDS - t0))" | tee -a "$OUT/summary.txt"
done
if "$PYTHON" -c "import sglang" >/dev/null 2>&1; then
  echo "sglang imports: run tools/sglang_check.py in a call of its own" | tee -a "$OUT/summary.txt"
fi
echo; echo "=== summary ($(head -n 1 "$OUT/gpu.txt"), $((SECONDS - START))s)"
cat "$OUT/summary.txt"
