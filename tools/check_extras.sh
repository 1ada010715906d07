#!/usr/bin/env bash
# Resolve every install combination the README documents, on the platform each one targets, without
# installing anything (pip's resolver in --dry-run mode), and print one line per combination:
#
#   <combination> | <target platform> | OK: torch=... transformers=... (<n> packages)   or   FAIL: <pip's reason>
#
# CPU combinations (the README's two commands) resolve for this machine, with constraints-cpu.txt, exactly
# as the README installs them. GPU combinations resolve for Python 3.12 on manylinux x86_64 wheels
# (--platform / --python-version / --only-binary=:all:, so nothing is built), from the requirement lists
# of setup.py. Needs network access to the package index; a fresh pip is installed into a scratch venv.
#
# [te] is expected to print FAIL here: transformer_engine_torch (what transformer-engine[pytorch] pins) has
# no cp312 manylinux wheel on the index, only a source build against the node's torch and CUDA toolkit:
# on the GPU node, `pip install --no-build-isolation "transformer-engine[pytorch]>=2.4"` after torch.
#
# Usage: bash tools/check_extras.sh [--keep]   (--keep leaves the scratch directory and the JSON reports)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SCRATCH=$(mktemp -d /tmp/check_extras.XXXXXX)
trap '[[ "${1:-}" == "--keep" ]] || rm -rf "$SCRATCH"' EXIT

python3 -m venv "$SCRATCH/venv" >/dev/null
PIP="$SCRATCH/venv/bin/pip"
"$PIP" install -q -U pip packaging >/dev/null 2>&1 || true   # --report and PEP 658 metadata need a recent pip
PY="$SCRATCH/venv/bin/python"

# setup.py's requirement lists, read without running setup(), for a GPU node: pip evaluates the
# environment markers of the requirements it is given against the interpreter it runs on, not against
# --python-version, so on a Python 3.11 machine "megatron-core ...; python_version >= '3.12'" would be
# dropped and 0.16.1 resolved. The markers are evaluated here for CPython 3.12 on Linux x86_64 instead.
requirements() {  # $1 = comma-separated extras ("" = core only)
  "$PY" - "$1" <<'EOF'
import ast, sys
from packaging.requirements import Requirement
tree = ast.parse(open("setup.py").read())
values = {t.id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
          for t in n.targets if isinstance(t, ast.Name) and t.id in ("CORE", "EXTRAS")}
reqs = list(values["CORE"])
for extra in filter(None, sys.argv[1].split(",")):
    reqs += values["EXTRAS"][extra]
gpu_node = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
for req in map(Requirement, reqs):
    if req.marker is None or req.marker.evaluate(gpu_node):
        req.marker = None
        print(req)
EOF
}

summary() {  # $1 = report.json -> "torch=... transformers=... (n packages)"
  "$PY" - "$1" <<'EOF'
import json, sys
items = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.load(open(sys.argv[1]))["install"]}
keys = ["torch", "triton", "transformers", "megatron-core", "sglang", "transformer-engine", "nvidia-dali-cuda130"]
print(" ".join(f"{k}={items[k]}" for k in keys if k in items) + f" ({len(items)} packages)")
EOF
}

report_line() {  # $1 name, $2 platform, $3 log, $4 report
  if [[ -s "$4" ]]; then
    printf '%-34s | %-28s | OK: %s\n' "$1" "$2" "$(summary "$4")"
  else
    # pip's own explanation: the conflicting pins, else the requirement it could not find
    reason=$(sed -n '/The conflict is caused by:/,/^$/p' "$3" | sed '1d;/^$/d;s/^ *//' | head -n 6 | paste -sd ';' -)
    [[ -n "$reason" ]] || reason=$(grep -E "^ERROR" "$3" | head -n 2 | tr '\n' ' ')
    reason=$(printf '%s' "$reason" | cut -c1-400)
    printf '%-34s | %-28s | FAIL: %s\n' "$1" "$2" "${reason:-see $3}"
  fi
}

# --- CPU: the README's commands, this machine's platform, the CPU constraints.
cpu() {  # $1 name, $2 extras spec for the local project
  local log="$SCRATCH/$1.log" rep="$SCRATCH/$1.json"
  timeout 900 "$PIP" install --dry-run --ignore-installed --quiet --report "$rep" \
    -c "$ROOT/constraints-cpu.txt" "torch==2.13.0" "$ROOT$2" >"$log" 2>&1 || rm -f "$rep"
  report_line "$1" "this machine, python$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')" "$log" "$rep"
}

# --- GPU: Python 3.12, manylinux x86_64 wheels only.
# pip matches --platform tags exactly, so list every glibc level a current GPU node satisfies (2.5 .. 2.39).
PLATFORMS=()
for minor in $(seq 39 -1 5); do PLATFORMS+=(--platform "manylinux_2_${minor}_x86_64"); done
for tag in manylinux2014 manylinux2010 manylinux1 linux; do PLATFORMS+=(--platform "${tag}_x86_64"); done
gpu() {  # $1 name, $2 extras
  local log="$SCRATCH/$1.log" rep="$SCRATCH/$1.json" reqs="$SCRATCH/$1.txt"
  requirements "$2" >"$reqs"
  # --isolated: this machine's pip configuration (its own caps and local indexes) says nothing about a GPU node
  timeout 900 "$PIP" install --isolated --dry-run --ignore-installed --report "$rep" "${PLATFORMS[@]}" \
    --python-version 3.12 --implementation cp --abi cp312 --only-binary=:all: -r "$reqs" >"$log" 2>&1 || rm -f "$rep"
  report_line "$1" "cp312 manylinux x86_64" "$log" "$rep"
}

cpu "cpu: ." ""
cpu "cpu: .[dev,megatron]" "[dev,megatron]"
gpu "gpu: .[megatron]" "megatron"
gpu "gpu: .[sglang]" "sglang"
gpu "gpu: .[te]" "te"
gpu "gpu: .[dali]" "dali"
gpu "gpu: .[megatron,sglang,te,dali]" "megatron,sglang,te,dali"
gpu "gpu: .[megatron,sglang,dali]" "megatron,sglang,dali"   # then Transformer Engine from source, see above
