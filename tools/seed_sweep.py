"""Does the default visibly learn? SFT, RL and a frozen-policy RL run for several seeds, with intervals.

For each seed ``k`` (``train.seed = data.seed = model.init_seed = k``) the tool runs, as separate
processes through the package's CLI, exactly what a user runs (2 and 3 side by side):

1. ``care-sft``: the cold-start SFT policy, ``<out>/seed<k>/sft``;
2. ``care-train`` from that policy: ``<out>/seed<k>/``;
3. the same ``care-train`` with ``train.lr`` at ``--frozen-lr`` (1e-10: Adam's step is then ~1e-10 per
   parameter, i.e. a frozen policy) into ``<out>/seed<k>/frozen/``. It draws the same prompts in the
   same order with the same sampling seeds, so its training accuracy is the prompt sequence's own
   difficulty curve; the RL run's excess over it is what the policy learned. It skips held-out
   evaluation (``data.eval_size=0``), which does not change the training records.

It then prints, per seed and as mean with a 95% Student-t interval over the seeds (n - 1 degrees of
freedom):

* held-out accuracy of the SFT policy (the RL run's step-0 evaluation) and after RL (its last
  evaluation), their difference, and the same per task;
* held-out (greedy) format rate and mean ``<think>`` length of the SFT policy and after RL: a policy
  that keeps its accuracy while it drops its rationale has not learned what CARE is after;
* the mean training (rollout) accuracy of the last ``--last`` steps of the RL run and of the frozen
  run, and their difference; the RL run's training format rate and ``<think>`` length over the same steps;
* wall time of the two user commands (``care-sft`` + ``care-train``).

It writes ``<out>/summary.json``, ``<out>/table.txt`` and, per seed, redraws ``<out>/seed<k>/curves.png``
with the frozen run overlaid and the RL - frozen training-accuracy panel
(``care_megatron.plotting.plot_run(..., baseline=...)``). Finished phases (their outputs exist) are not
run again, so an interrupted sweep continues where it stopped. ``--jobs N`` runs N seeds at once
(every run with ``--threads``, default 1), so wall times measured in a sweep are of a shared machine;
time the user's command on its own for the README.

Usage::

    python tools/seed_sweep.py --config examples/configs/tiny_cpu.yaml --out runs/sweep --seeds 3 --jobs 2
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from care_megatron.metrics import read_run_metrics  # noqa: E402
from care_megatron.stats import mean_interval as _t_interval  # noqa: E402


def mean_interval(values: list[float]) -> dict:
    """Mean and 95% t-interval over the seeds (:func:`care_megatron.stats.mean_interval`, the same
    statistics as ``tools/compare_algorithms.py``); one value has no interval (NaN bounds)."""
    stat = _t_interval(values)
    nan = float("nan")
    return {"mean": stat["mean"], "low": nan if stat["low"] is None else stat["low"],
            "high": nan if stat["high"] is None else stat["high"], "n": stat["n"]}


def run_command(command: str, config: str | None, overrides: list[str], log_path: Path) -> float:
    """``python -m care_megatron.cli <command>`` with ``overrides``; returns its wall time in seconds."""
    argv = [sys.executable, "-m", "care_megatron.cli", command, *(["--config", config] if config else []),
            *overrides, "--no-progress"]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed with exit code {done.returncode}; see {log_path}")
    return time.perf_counter() - start


def finished(directory: Path, steps: int) -> bool:
    rows = [r for r in read_run_metrics(directory / "metrics.jsonl") if "loss" in r]
    return bool(rows) and rows[-1]["step"] >= steps and (directory / "final").is_dir()


def run_seed(config: str | None, overrides: list[str], seed: int, out: Path, frozen_lr: float, steps: int,
             threads: int) -> dict:
    directory = out / f"seed{seed}"
    common = [*overrides, f"train.seed={seed}", f"data.seed={seed}", f"model.init_seed={seed}",
              f"train.threads={threads}", f"train.output_dir={directory}", f"train.init_from={directory / 'sft'}"]
    timings_path = directory / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    if not (directory / "sft" / "config.json").exists():
        timings["sft_s"] = run_command("sft", config, common, directory / "log.txt")
    frozen = directory / "frozen"
    runs = {}  # the RL and the frozen run are independent once the SFT policy exists: run them side by side
    if not finished(directory, steps):
        runs["train_s"] = (common, directory / "log.txt")
    if not finished(frozen, steps):
        runs["frozen_s"] = ([*common, f"train.output_dir={frozen}", f"train.lr={frozen_lr}", "data.eval_size=0"],
                            frozen / "log.txt")
    if runs:
        with ThreadPoolExecutor(max_workers=len(runs)) as pool:
            futures = {key: pool.submit(run_command, "train", config, overrides, log)
                       for key, (overrides, log) in runs.items()}
            timings.update({key: future.result() for key, future in futures.items()})
    directory.mkdir(parents=True, exist_ok=True)
    timings_path.write_text(json.dumps(timings, indent=1))
    return timings


HELDOUT = (("eval/", "heldout", "held-out accuracy (greedy)"),
           ("eval_sampled/", "heldout_sampled", "held-out accuracy (sampled, mean@N)"))
"""Held-out metric families: metric prefix, summary key prefix, label. ``eval_sampled/`` exists when the
runs set ``eval.samples``."""


RATIONALE = (("format", "format/mean", "format"), ("think_length", "length/think_mean", "think length"))
"""Format and rationale beside accuracy: held-out metric ``eval/<name>`` (greedy), the training metric of
the same quantity (think length: ``<think>`` tokens, tags included), and the label. Runs from before
``eval/think_length`` was logged lack those rows."""


def _number(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def heldout_summary(rows: list[dict], prefix: str, key: str) -> dict:
    """SFT (first evaluation) and final held-out accuracy of one metric family, overall and per task."""
    evals = [r for r in rows if f"{prefix}accuracy" in r]
    if not evals:
        return {}
    first, final = evals[0], evals[-1]
    tasks = sorted(k[len(f"{prefix}accuracy/"):] for k in first if k.startswith(f"{prefix}accuracy/"))
    return {f"{key}_sft": first[f"{prefix}accuracy"], f"{key}_final": final[f"{prefix}accuracy"],
            f"{key}_gain": final[f"{prefix}accuracy"] - first[f"{prefix}accuracy"],
            f"{key}_steps": [first["step"], final["step"]],
            f"{key}_curve": [[r["step"], r[f"{prefix}accuracy"]] for r in evals],
            f"{key}_per_task": {t: [first[f"{prefix}accuracy/{t}"], final.get(f"{prefix}accuracy/{t}", float("nan"))]
                                for t in tasks}}


def seed_summary(directory: Path, last: int) -> dict:
    rows = read_run_metrics(directory / "metrics.jsonl")
    frozen_rows = read_run_metrics(directory / "frozen" / "metrics.jsonl")
    steps = [r for r in rows if "accuracy/mean" in r]
    frozen_steps = [r for r in frozen_rows if "accuracy/mean" in r]
    if not any("eval/accuracy" in r for r in rows) or not steps or not frozen_steps:
        raise RuntimeError(f"{directory}: missing evaluations or steps in metrics.jsonl")
    # compared over the steps both runs have reached (an unfinished run is summarised as far as it got)
    common = sorted({r["step"] for r in steps} & {r["step"] for r in frozen_steps})[-last:]

    def tail_mean(seq: list[dict], key: str = "accuracy/mean") -> float | None:
        values = [r[key] for r in seq if r["step"] in common and _number(r.get(key))]
        return sum(values) / len(values) if values else None

    summary = {"train_last": tail_mean(steps), "frozen_last": tail_mean(frozen_steps), "train_steps": [common[0], common[-1]]}
    for prefix, key, _ in HELDOUT:
        summary.update(heldout_summary(rows, prefix, key))
    evals = [r for r in rows if "eval/accuracy" in r]
    for name, training_key, _ in RATIONALE:
        for end, row in (("sft", evals[0]), ("final", evals[-1])):
            if _number(row.get(f"eval/{name}")):
                summary[f"heldout_{name}_{end}"] = row[f"eval/{name}"]
        value = tail_mean(steps, training_key)
        if value is not None:
            summary[f"train_{name}_last"] = value
    summary["per_task"] = summary["heldout_per_task"]
    summary["train_gain_over_frozen"] = summary["train_last"] - summary["frozen_last"]
    timings_path = directory / "timings.json"
    if timings_path.exists():
        timings = json.loads(timings_path.read_text())
        summary["timings"] = timings
        if "sft_s" in timings and "train_s" in timings:
            summary["user_commands_s"] = timings["sft_s"] + timings["train_s"]
    return summary


def _fmt(stat: dict) -> str:
    if stat["n"] < 2:
        return f"{stat['mean']:.3f}"
    return f"{stat['mean']:.3f} [{stat['low']:.3f}, {stat['high']:.3f}]"


def report(per_seed: dict[int, dict], last: int) -> tuple[dict, str]:
    seeds = sorted(per_seed)
    keys = []
    for _, key, label in HELDOUT:
        keys += [(f"{key}_sft", f"{label}, SFT policy"), (f"{key}_final", f"{label}, after RL"),
                 (f"{key}_gain", f"{label}: gain (RL - SFT)")]
    for name, _, label in RATIONALE:
        keys += [(f"heldout_{name}_sft", f"held-out {label} (greedy), SFT policy"),
                 (f"heldout_{name}_final", f"held-out {label} (greedy), after RL")]
    keys += [("train_last", f"training accuracy, last {last} steps, RL"),
             ("frozen_last", f"training accuracy, last {last} steps, frozen policy"),
             ("train_gain_over_frozen", "training-accuracy gain over frozen")]
    keys += [(f"train_{name}_last", f"training {label}, last {last} steps, RL") for name, _, label in RATIONALE]
    # a row only where every seed has its number (no eval.samples: no sampled rows; older runs: no think length)
    keys = [(key, label) for key, label in keys if all(per_seed[s].get(key) is not None for s in seeds)]
    aggregate = {key: mean_interval([per_seed[s][key] for s in seeds]) for key, _ in keys}
    times = [per_seed[s]["user_commands_s"] for s in seeds if "user_commands_s" in per_seed[s]]
    if times:
        aggregate["user_commands_s"] = mean_interval(times)
    lines = [f"{'metric':<52} " + " ".join(f"{'seed ' + str(s):>8}" for s in seeds) + "   mean [95% t-interval]"]
    for key, label in keys:
        lines.append(f"{label:<52} " + " ".join(f"{per_seed[s][key]:>8.3f}" for s in seeds) + f"   {_fmt(aggregate[key])}")
    lines.append(f"{'(held-out at steps; training accuracy over steps)':<52} " + " ".join(
        f"{'%d-%d' % tuple(per_seed[s]['heldout_steps']):>8}" for s in seeds) + "   " + " ".join(
        "%d-%d" % tuple(per_seed[s]["train_steps"]) for s in seeds))
    for _, key, label in HELDOUT:
        table = f"{key}_per_task"
        if not all(table in per_seed[s] for s in seeds):
            continue
        tasks = sorted(set().union(*(per_seed[s][table] for s in seeds)))
        suffix = "" if key == "heldout" else f"/{key}"
        for task in tasks:
            gains = [per_seed[s][table][task][1] - per_seed[s][table][task][0] for s in seeds if task in per_seed[s][table]]
            aggregate[f"heldout_gain/{task}{suffix}"] = mean_interval(gains)
            cells = " ".join(f"{per_seed[s][table][task][0]:.2f}->{per_seed[s][table][task][1]:.2f}"
                             if task in per_seed[s][table] else "-" for s in seeds)
            name = f"  held-out {task}{'' if key == 'heldout' else ' (sampled)'}: SFT -> RL"
            lines.append(f"{name:<52} {cells}   gain {_fmt(aggregate[f'heldout_gain/{task}{suffix}'])}")
    if times:
        lines.append(f"{'wall time care-sft + care-train (s)':<52} " + " ".join(f"{t:>8.0f}" for t in times)
                     + f"   {_fmt(aggregate['user_commands_s'])}")
    return aggregate, "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="examples/configs/tiny_cpu.yaml", help="YAML run config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at once (each with --threads threads)")
    parser.add_argument("--threads", type=int, default=1, help="train.threads of every run")
    parser.add_argument("--frozen-lr", type=float, default=1e-10, help="learning rate of the frozen-policy run")
    parser.add_argument("--last", type=int, default=10, help="training accuracy is averaged over this many last steps")
    parser.add_argument("--no-run", action="store_true", help="only summarise finished runs")
    args = parser.parse_args(argv)

    from care_megatron.config import load_config
    from care_megatron.plotting import plot_run

    out = Path(args.out)
    steps = load_config(args.config, args.overrides).train.steps
    seeds = list(range(args.seeds))
    if not args.no_run:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = [pool.submit(run_seed, args.config, args.overrides, s, out, args.frozen_lr, steps, args.threads)
                       for s in seeds]
            for future in futures:
                future.result()
    per_seed = {s: seed_summary(out / f"seed{s}", args.last) for s in seeds}
    for s in seeds:
        directory = out / f"seed{s}"
        plot_run(directory / "metrics.jsonl", directory / "curves.png", title=f"RL, seed {s}",
                 baseline=directory / "frozen" / "metrics.jsonl")
    aggregate, table = report(per_seed, args.last)
    print(table)
    result = {"config": args.config, "overrides": args.overrides, "seeds": seeds, "last": args.last,
              "frozen_lr": args.frozen_lr, "per_seed": per_seed, "aggregate": aggregate}
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    (out / "table.txt").write_text(table + "\n")
    return result


if __name__ == "__main__":
    main()
