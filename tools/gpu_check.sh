#!/usr/bin/env bash
# Every GPU check and benchmark of care_megatron in one call (sized to fit a ~10-minute device lease).
#
# Prepare once on the development machine (megatron-core travels as a wheel; the GPU image has torch,
# triton and transformers but no megatron-core, TE, SGLang or DALI):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 --platform any -d .whl megatron-core==0.16.1
# Then run it with `.whl` carried:  bash tools/gpu_check.sh   (writes logs under $OUT or ./gpu_check_out)
set -u
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

declare -a NAMES RESULTS
step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  NAMES+=("$name"); RESULTS+=("rc=$rc $((SECONDS - t0))s")
}

step gpu_tests 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests
step bench_kernels 90 python3 tools/bench_kernels.py
step bench_advantages 60 python3 tools/bench_advantages.py --device cuda --skip-loop
step bench_weight_sync 60 python3 tools/bench_weight_sync.py --device cuda --dtype bfloat16
if python3 -c "import sglang" >/dev/null 2>&1; then
  step sglang_check 240 python3 tools/sglang_check.py
else
  echo "=== sglang_check: skipped (sglang does not import here)"
fi
if [ -f tools/bench_train.py ]; then
  step bench_train 240 python3 tools/bench_train.py
fi

echo; echo "=== summary ($(head -n 1 "$OUT/gpu.txt"))"
for i in "${!NAMES[@]}"; do printf '%-20s %s\n' "${NAMES[$i]}" "${RESULTS[$i]}"; done
