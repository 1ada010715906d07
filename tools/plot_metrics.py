#!/usr/bin/env python
"""Plot one or several runs' metrics.jsonl into a PNG of curves.

    python tools/plot_metrics.py runs/tiny_cpu/metrics.jsonl --out curves.png
    python tools/plot_metrics.py runs/care/metrics.jsonl --compare grpo=runs/grpo/metrics.jsonl
    python tools/plot_metrics.py runs/sweep/seed0/metrics.jsonl --baseline runs/sweep/seed0/frozen/metrics.jsonl
"""
import argparse

from care_megatron.plotting import plot_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", help="metrics.jsonl of the main run")
    p.add_argument("--out", default="curves.png")
    p.add_argument("--title", default=None)
    p.add_argument("--compare", nargs="*", default=[], help="label=path/to/metrics.jsonl to overlay")
    p.add_argument("--baseline", default=None,
                   help="metrics.jsonl of a frozen-policy run on the same prompts (adds the RL - frozen panel)")
    args = p.parse_args()
    others = dict(item.split("=", 1) for item in args.compare)
    path = plot_run(args.metrics, args.out, title=args.title, others=others, baseline=args.baseline)
    print(f"wrote {path}" if path else "no plottable metrics found")


if __name__ == "__main__":
    main()
