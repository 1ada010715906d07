#!/usr/bin/env python
"""Per-GPU memory of a run config, phase by phase (rollout generate, weight sync, train), with a
verdict against the GPU's memory. The model and its assumptions: care_megatron/memory_plan.py.

    python tools/estimate_memory.py --config examples/configs/recipes/qwen2_5_vl_7b-care.yaml --gpus 16
    python tools/estimate_memory.py --config examples/configs/qwen3_vl_8b.yaml --gpu-memory-gib 79.6 --json

Exit status 0 when the plan fits, 1 when it does not, 2 on a bad config.
"""
from __future__ import annotations

import argparse
import json
import sys

from care_megatron.config import load_config
from care_megatron.memory_plan import ENGINE_OVERHEAD_GIB, TRAINER_OVERHEAD_GIB, plan_as_dict, plan_memory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="run config (YAML)")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides, as for care-train")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs in the job (default 8: one node; more GPUs only "
                                                             "shrink the distributed optimizer's shard)")
    parser.add_argument("--gpu-memory-gib", type=float, default=79.6, help="memory of one GPU (80 GB cards: 79.6)")
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="prompt length (text + image tokens) for the KV demand")
    parser.add_argument("--trainer-overhead-gib", type=float, default=TRAINER_OVERHEAD_GIB)
    parser.add_argument("--engine-overhead-gib", type=float, default=ENGINE_OVERHEAD_GIB)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        plan = plan_memory(config, args.gpu_memory_gib, args.gpus, prompt_tokens=args.prompt_tokens,
                           trainer_overhead_gib=args.trainer_overhead_gib, engine_overhead_gib=args.engine_overhead_gib)
    except (ValueError, OSError) as exc:
        print(f"estimate_memory: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan_as_dict(plan), indent=1) if args.json else plan.report())
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
