"""Compare RL methods over seeds at any scale: the paper's Table 2 from one base config.

Every (method, seed) pair is run with the same base config, so the data (``data.seed``: same prompts
in the same order), the rollout budget (prompts per step x group size, ``max_new_tokens``) and the
decoding (temperature, top-p / top-k) are identical; only ``algorithm.*`` and ``train.seed`` differ.
Runs live in ``<out>/runs/<method>/seed<k>/``; a run is finished when its ``metrics.jsonl`` reaches
``train.steps`` and its ``final/`` policy exists. Finished runs are never re-run, an interrupted one
resumes from its newest checkpoint (the trainer's ``--resume``).

Methods: ``grpo``, ``care_no_rgr`` (CARE without reflection-guided resampling), ``care``, and the
baselines ``dapo``, ``gspo``, ``dr_grpo``, ``rloo``.

Outputs in ``<out>/``:

* ``table.md`` / the ``table`` entry of ``summary.json``: final (greedy) held-out accuracy per task and their
  macro average, mean and 95% confidence interval over seeds (Student t, n - 1 degrees of freedom, on
  the per-seed values), and the difference to GRPO with its interval (paired by seed: run k of every
  method shares seed k, so the interval is over the per-seed differences); ``table_sampled``: the same
  for the mean@N held-out accuracy at the rollout's sampling settings, when the runs set ``eval.samples``;
* held-out format rate and mean ``<think>`` length at the final evaluation (greedy, and sampled when the
  runs set ``eval.samples``), mean and interval over seeds: accuracy kept by dropping the rationale is
  not what CARE is after;
* the mechanism metrics, each averaged over the steps of a run, then mean and interval over seeds:
  failure-signal share, RGR trigger and success rate, rescue rate, mean ``<think>`` length;
* the PPO update, likewise averaged over steps: the clip fractions (``clip_frac/*``; ``neg_adv_answer``
  is the paper's Fig. 6 rate on negative-advantage answer tokens) and ``ppo/approx_kl``;
* ``accuracy_vs_tokens.png``: held-out accuracy against decoded tokens (mean and a 95% band per
  method, seeds interpolated onto a shared token grid; ``sampled_accuracy_vs_tokens.png`` likewise for
  the sampled one), ``kl.png``: KL to the reference per step;
* ``summary.json``: all of it, with the curves' numbers.

With ``--benchmarks NAME=PATH,...`` (the paper's benchmarks, spelled as for ``care-eval``), every
finished run's final policy (``<run>/final``) is also scored on them through ``care-eval``'s code
(``care_megatron.evaluation.run.run_benchmark_evaluation``) under the base config's ``eval.protocol``
(``greedy``, or ``paper``: ``eval.seeds`` seeded decodes per example at the rollout's sampling
settings), into ``<out>/bench/<protocol>/<method>/seed<k>/`` (per-example JSONL, ``summary.json``,
``table.md``): right after a run trains here, and for every finished run at each call (``--no-run``
included; after ``--slurm`` this is where scoring happens). A folder whose ``summary.json`` covers the
requested benchmarks under the same protocol and seed count is not redone; a partial one resumes from
its JSONL files; one of another protocol or decoding is refused by ``care-eval``'s check (the folder
name carries the protocol, so the same runs can be scored under both). Then:

* ``table1.md`` (and ``table1`` in ``summary.json``): the paper's Table 1 layout, per benchmark and the
  macro average, each method's mean and 95% t-interval over the training seeds of its runs' accuracies,
  below the paper's published rows for the same base model (matched from ``model.name`` /
  ``train.init_from`` as ``care-eval`` does, or ``eval.published_base``);
* ``table2.md`` (``table2``): the paper's Table 2 layout for GRPO / CARE without RGR / CARE (the methods
  ``grpo``, ``care_no_rgr``, ``care`` that were run), per benchmark and the macro average, with the
  macro's difference to GRPO paired by seed ("vs GRPO", mean ± half-width of its t-interval), and the
  per-benchmark paired differences below;
* copies of both under ``<out>/bench/<protocol>/``, so the tables of both protocols survive.

Decoded tokens of a step are the trainer's exact ``tokens/decoded`` (every rollout, DAPO refill and RGR
continuation decoded). For runs from before that key, they are rebuilt from what the trainer logs (``care_megatron.metrics``):
``length/response_mean`` times the number of responses decoded that step, with the number of groups
from ``groups/count`` (else ``data.prompts_per_step``; DAPO: kept + dropped groups of
``dapo/*_groups``) times ``rollout.group_size``, plus ``rgr/trigger_rate`` x groups reflected
samples. When the log carries the reflected samples' response length separately (a ``rgr/*`` key
with ``length`` and neither ``think`` nor ``answer`` in its name), ``length/response_mean`` is read as the first-pass rollouts' mean and the
reflected tokens are added from that key; otherwise ``length/response_mean`` covers both.

On a cluster, ``--slurm`` prints one ``sbatch`` line per unfinished run (``--submit``: submits them)
with an sbatch script that takes ``CONFIG`` from the environment and overrides as arguments, like
``examples/slurm/*.sbatch``; run the tool again without ``--slurm`` (``--no-run`` to never train
here) once they are done to write the table.

Usage::

    python tools/compare_algorithms.py --config examples/configs/tiny_cpu.yaml --out runs/compare \\
        --seeds 3 train.steps=40 train.lr=1e-3 data.train_size=8
    python tools/compare_algorithms.py --config examples/configs/qwen2_5_vl_7b.yaml --out runs/table2 \\
        --slurm --sbatch examples/slurm/care_qwen2_5_vl_7b.sbatch
    python tools/compare_algorithms.py --config examples/configs/qwen2_5_vl_7b.yaml --out runs/table2 --no-run \\
        --benchmarks mathvista=/data/MathVista,mmmu=/data/MMMU eval.protocol=paper eval.seeds=5
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from care_megatron.evaluation.benchmarks import BENCHMARKS  # noqa: E402
from care_megatron.metrics import read_run_metrics  # noqa: E402
from care_megatron.stats import mean_interval  # noqa: E402

METHODS = {
    "grpo": ["algorithm.name=grpo"],
    "care_no_rgr": ["algorithm.name=care", "algorithm.rgr=false"],
    "care": ["algorithm.name=care", "algorithm.rgr=true"],
    "dapo": ["algorithm.name=dapo"],
    "gspo": ["algorithm.name=gspo"],
    "dr_grpo": ["algorithm.name=dr_grpo"],
    "rloo": ["algorithm.name=rloo"],
}
"""Method name -> the overrides that select it on top of the base config."""
DEFAULT_METHODS = ("grpo", "care_no_rgr", "care")
MECHANISMS = (("signal/failure_share", "failure-signal share"), ("rgr/trigger_rate", "RGR trigger rate"),
              ("rgr/success_rate", "RGR success rate"), ("rescue/rate", "rescue rate"),
              ("length/think_mean", "mean think length"))
PPO_UPDATE = (("clip_frac/all", "clip frac, all"), ("clip_frac/pos_adv", "A > 0"), ("clip_frac/neg_adv", "A < 0"),
              ("clip_frac/answer", "answer"), ("clip_frac/think", "think"), ("clip_frac/dual", "dual clip"),
              ("clip_frac/neg_adv_answer", "A < 0, answer (Fig. 6)"), ("ppo/approx_kl", "approx. KL"))
"""Per-step metrics of the trainer's PPO update that the comparison averages over steps, like MECHANISMS."""
HELDOUT_RATIONALE = (("eval/format", "format (greedy)"), ("eval/think_length", "think length (greedy)"),
                     ("eval_sampled/format", "format (sampled)"),
                     ("eval_sampled/think_length", "think length (sampled)"))
"""Held-out format rate and mean ``<think>`` tokens, read at a run's final evaluation like its accuracy."""

TRAIN_WINDOW = 10
"""Training accuracy (``accuracy/mean`` of the G original rollouts per prompt) is averaged over the first and
the last this-many steps of a run: on a fixed prompt set it moves when held-out accuracy cannot."""

SMOOTH = 5
"""The training-accuracy curve is the trailing mean over this many steps (one step's 8 prompts are noisy)."""


# ------------------------------------------------------------------------------------ runs
def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / "runs" / method / f"seed{seed}"


def read_rows(directory: Path) -> list[dict]:
    return read_run_metrics(directory / "metrics.jsonl")


def is_finished(directory: Path, steps: int) -> bool:
    rows = read_rows(directory)
    return bool(rows) and max(r.get("step", -1) for r in rows) >= steps and (directory / "final").is_dir()


def run_overrides(base_overrides: list[str], method: str, seed: int, directory: Path) -> list[str]:
    return [*base_overrides, *METHODS[method], f"train.seed={seed}", f"train.output_dir={directory}"]


def run_locally(config_path: str | None, overrides: list[str], directory: Path) -> None:
    from care_megatron.config.loader import load_config
    from care_megatron.trainer import train

    config = load_config(config_path, overrides)
    resume = (directory / "checkpoints").is_dir()
    train(config, resume=resume, progress=False)


def sbatch_line(sbatch: str, config_path: str | None, overrides: list[str], job_name: str, directory: Path) -> str:
    env = f"--export=ALL,CONFIG={config_path}" if config_path else "--export=ALL"
    return " ".join(["sbatch", f"--job-name={job_name}", env, f"--output={directory}/slurm-%j.out",
                     shlex.quote(sbatch), *map(shlex.quote, overrides), "--resume"])


# ------------------------------------------------------------------------------------ benchmarks
TABLE2_METHODS = {"grpo": ("GRPO (Baseline)", False, False), "care_no_rgr": ("CARE w/o RGR", True, False),
                  "care": ("CARE", True, True)}
"""Rows of the paper's Table 2: method -> (row name, Anchor, RGR)."""


def bench_dir(out: Path, protocol: str, method: str, seed: int) -> Path:
    return out / "bench" / protocol / method / f"seed{seed}"


def bench_finished(directory: Path, benchmarks: dict[str, str], protocol: str, seeds: int) -> bool:
    """``summary.json`` written for every benchmark in ``benchmarks`` under ``protocol`` (and, for ``paper``,
    ``seeds`` decodes per example). Anything else is (re)run: resumed from the JSONL files, or refused by
    ``care-eval`` when the folder holds another protocol or decoding."""
    path = directory / "summary.json"
    if not path.exists():
        return False
    try:
        summary = json.loads(path.read_text())
    except ValueError:
        return False
    decoding = summary.get("decoding", {})
    if decoding.get("protocol", "greedy") != protocol or (protocol == "paper" and decoding.get("seeds") != seeds):
        return False
    results = summary.get("results", {})
    return all(name in results for name in benchmarks)


def score_run(config_path: str | None, overrides: list[str], directory: Path, output_dir: Path,
              benchmarks: dict[str, str], label: str, published_base: str = "auto") -> dict:
    """``care-eval --benchmarks`` of the run's final policy, into ``output_dir``: its summary."""
    import dataclasses

    from care_megatron.config.loader import load_config
    from care_megatron.evaluation.run import run_benchmark_evaluation

    config = load_config(config_path, overrides)
    config = dataclasses.replace(config, eval=dataclasses.replace(config.eval, output_dir=str(output_dir), label=label,
                                                                  published_base=published_base))
    return run_benchmark_evaluation(config, checkpoint=str(directory / "final"), benchmarks=benchmarks,
                                    progress=False).to_dict()


def read_bench(directory: Path) -> dict:
    """A run's benchmark numbers from its ``summary.json``: ``per_task`` (benchmark -> accuracy), ``macro``,
    ``macro_over`` and the ``decoding`` record (the shape ``heldout_table`` reads)."""
    summary = json.loads((directory / "summary.json").read_text())
    macro = summary.get("macro_accuracy")
    return {"per_task": {name: r["accuracy"] for name, r in summary["results"].items() if r.get("n")},
            "macro": macro if isinstance(macro, (int, float)) and math.isfinite(macro) else None,
            "macro_over": summary.get("macro_over", []), "decoding": summary.get("decoding", {})}


def benchmark_tables(bench: dict[str, dict[int, dict]], names: list[str]) -> dict:
    """Table 1 / Table 2 numbers from ``{method: {seed: read_bench(...)}}``: per method and column (each
    benchmark of ``names``, ``macro``), mean and t-interval over seeds, and the paired-by-seed delta to GRPO."""
    table = heldout_table(bench, names)
    decoding = next((r["decoding"] for runs in bench.values() for r in runs.values()), {})
    over = sorted({len(r["macro_over"]) for runs in bench.values() for r in runs.values()})
    return {"benchmarks": names, "protocol": decoding.get("protocol", "greedy"), "decoding": decoding,
            "macro_over": over, "table": table,
            "table2_methods": [m for m in TABLE2_METHODS if m in table],
            "runs": {m: {str(s): r for s, r in runs.items()} for m, runs in bench.items()}}


def _percent(stat: dict | None, digits: int = 1, delta: bool = False) -> str:
    if not stat or stat.get("mean") is None:
        return "—"
    text = f"{round(100 * stat['mean'], digits) + 0.0:{'+' if delta else ''}.{digits}f}"  # + 0.0: no "-0.0"
    return text + (f" ± {100 * stat['half_width']:.{digits}f}" if stat.get("half_width") is not None else "")


def _protocol_note(result: dict, seeds: int) -> str:
    from care_megatron.evaluation.benchmark_eval import protocol_sentence

    return (f"Ours: mean ± half-width of the 95% t-interval over the {seeds} training seed(s) of a method "
            "(n - 1 dof) of each run's accuracy, in percent; each run's accuracy from its own evaluation. "
            "Each run's evaluation: " + protocol_sentence(result["decoding"], intervals=False)
            + f" (Its own intervals: bench/{result['protocol']}/<method>/seed<k>/table.md.)")


def table1_markdown(result: dict, model_name: str, base_model: str = "auto") -> str:
    """The paper's Table 1 layout: the paper's rows for the base model, then one row per method."""
    from care_megatron.evaluation.benchmark_eval import published_rows, table_header

    paper_rows, paper_note = published_rows(model_name, base_model)
    lines = [table_header(), *paper_rows]
    macro_over = "" if result["macro_over"] in ([], [len(BENCHMARKS)]) else \
        f" (over {'/'.join(map(str, result['macro_over']))})"
    for method, row in result["table"].items():
        cells = [_percent(row.get(n)) for n in BENCHMARKS]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {_percent(row['macro'])}{macro_over} |")
    seeds = max((row["macro"].get("n", 0) for row in result["table"].values()), default=0)
    return "\n".join(lines) + "\n\n" + "\n".join([_protocol_note(result, seeds), paper_note]) + "\n"


def table2_markdown(result: dict) -> str:
    """The paper's Table 2 layout for the methods of ``TABLE2_METHODS`` that were run, with "vs GRPO"."""
    from care_megatron.evaluation.benchmark_eval import COLUMN_TITLES

    methods = result["table2_methods"]
    titles = [COLUMN_TITLES[n] for n in BENCHMARKS]
    lines = ["| Method | Anchor | RGR | " + " | ".join(titles) + " | Avg. | vs GRPO |",
             "|---" * (len(titles) + 5) + "|"]
    for method in methods:
        name, anchor, rgr = TABLE2_METHODS[method]
        row = result["table"][method]
        cells = [_percent(row.get(n)) for n in BENCHMARKS]
        vs = "—" if method == "grpo" else _percent(row["macro"].get("delta_vs_grpo"), 2, delta=True)
        lines.append(f"| {name} | {'✓' if anchor else '✗'} | {'✓' if rgr else '✗'} | " + " | ".join(cells)
                     + f" | {_percent(row['macro'], 2)} | {vs} |")
    deltas = [m for m in methods if m != "grpo" and "delta_vs_grpo" in result["table"][m]["macro"]]
    if deltas:
        lines += ["", "| Δ vs GRPO (paired by seed) | " + " | ".join(titles) + " | Avg. |", "|---" * (len(titles) + 2) + "|"]
        for method in deltas:
            row = result["table"][method]
            lines.append(f"| {TABLE2_METHODS[method][0]} | "
                         + " | ".join(_percent(row[n].get("delta_vs_grpo"), delta=True) if n in row else "—"
                                      for n in BENCHMARKS)
                         + f" | {_percent(row['macro'].get('delta_vs_grpo'), 2, delta=True)} |")
    seeds = max((result["table"][m]["macro"].get("n", 0) for m in methods), default=0)
    notes = [_protocol_note(result, seeds),
             "vs GRPO / Δ: the difference to GRPO paired by seed (run k of every method shares train.seed k), mean ± "
             "half-width of the 95% t-interval over the per-seed differences, in points."]
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


# ------------------------------------------------------------------------------------ aggregation
def decoded_tokens(row: dict, prompts_per_step: int, group_size: int) -> float:
    """Tokens decoded in one logged step: the trainer's exact ``tokens/decoded`` when the run logged it, else
    the estimate described in the module docstring."""
    exact = row.get("tokens/decoded")
    if isinstance(exact, (int, float)) and math.isfinite(exact):
        return float(exact)
    response_mean = row.get("length/response_mean")
    if not isinstance(response_mean, (int, float)) or not math.isfinite(response_mean):
        return 0.0
    if "dapo/kept_groups" in row:
        groups = row["dapo/kept_groups"] + row.get("dapo/dropped_groups", 0.0)
    else:
        groups = row.get("groups/count", prompts_per_step)
    rollouts = groups * group_size
    reflected = row.get("rgr/trigger_rate", 0.0) * groups
    # a whole-response length of the reflected samples (not a think- or answer-only one)
    separate = sorted(k for k in row if k.startswith("rgr/") and "length" in k and "think" not in k
                      and "answer" not in k and isinstance(row[k], (int, float)))
    if separate:
        return rollouts * response_mean + reflected * row[separate[0]]
    return (rollouts + reflected) * response_mean


def run_summary(rows: list[dict], prompts_per_step: int, group_size: int) -> dict:
    """Per-run numbers: final eval, per-step means of the mechanism metrics, curves."""
    cumulative, tokens_at_step = 0.0, {0: 0.0}
    for row in sorted((r for r in rows if r.get("step", 0) > 0), key=lambda r: r["step"]):
        cumulative += decoded_tokens(row, prompts_per_step, group_size)
        tokens_at_step[row["step"]] = cumulative
    evals = [r for r in rows if isinstance(r.get("eval/accuracy"), (int, float))]
    final = max(evals, key=lambda r: r["step"]) if evals else {}
    per_task = {k[len("eval/accuracy/"):]: v for k, v in final.items() if k.startswith("eval/accuracy/")}
    sampled_evals = [r for r in rows if isinstance(r.get("eval_sampled/accuracy"), (int, float))]
    sampled_final = max(sampled_evals, key=lambda r: r["step"]) if sampled_evals else {}
    train_rows = [r for r in rows if r.get("step", 0) > 0 and "reward/mean" in r]
    ordered = [r for r in sorted(train_rows, key=lambda r: r["step"]) if isinstance(r.get("accuracy/mean"), (int, float))]
    accuracy = [r["accuracy/mean"] for r in ordered]
    window = min(TRAIN_WINDOW, len(accuracy))
    training = {"first": sum(accuracy[:window]) / window if window else None,
                "last": sum(accuracy[-window:]) / window if window else None}
    training["gain"] = None if training["first"] is None else training["last"] - training["first"]
    trailing = [accuracy[max(0, i - SMOOTH + 1):i + 1] for i in range(len(accuracy))]
    return {
        "training_accuracy": training,
        "final_step": final.get("step"),
        "per_task": per_task,
        "macro": final.get("eval/macro_accuracy"),
        "mechanisms": step_means(train_rows, MECHANISMS),
        "ppo_update": step_means(train_rows, PPO_UPDATE),
        "heldout_rationale": {key: (final if key.startswith("eval/") else sampled_final).get(key)
                              for key, _ in HELDOUT_RATIONALE},
        "accuracy_curve": [(tokens_at_step.get(r["step"], cumulative), r["eval/accuracy"]) for r in evals],
        # eval.samples > 0: the mean@N held-out accuracy at the rollout's sampling settings
        "sampled": {"per_task": {k[len("eval_sampled/accuracy/"):]: v for k, v in sampled_final.items()
                                 if k.startswith("eval_sampled/accuracy/")},
                    "macro": sampled_final.get("eval_sampled/macro_accuracy"),
                    "accuracy_curve": [(tokens_at_step.get(r["step"], cumulative), r["eval_sampled/accuracy"])
                                       for r in sampled_evals]} if sampled_evals else None,
        "kl_curve": [(r["step"], r["kl"]) for r in train_rows if isinstance(r.get("kl"), (int, float))],
        "train_accuracy_curve": [(tokens_at_step.get(r["step"], cumulative), sum(w) / len(w)) for r, w in zip(ordered, trailing)],
        "decoded_tokens": cumulative,
    }


def step_means(rows: list[dict], metrics: tuple[tuple[str, str], ...]) -> dict[str, float | None]:
    """Per metric key, its mean over the ``rows`` (steps) that logged a finite value; None where none did
    (an older run, or a method that does not log it)."""
    out = {}
    for key, _ in metrics:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        out[key] = sum(values) / len(values) if values else None
    return out


def heldout_table(summaries: dict[str, dict[int, dict]], tasks: list[str]) -> dict:
    """Per method and column (each task, ``macro``): mean and interval over seeds, and the paired delta to
    GRPO. ``summaries`` holds ``{"per_task", "macro"}`` per (method, seed)."""
    reference = summaries.get("grpo")
    table = {}
    for method, runs in summaries.items():
        seeds = sorted(runs)
        row = {}
        for column in [*tasks, "macro"]:
            def value(s, c=column, of=runs):
                return of[s]["macro"] if c == "macro" else of[s]["per_task"].get(c)

            row[column] = mean_interval([value(s) for s in seeds])
            if reference is not None and method != "grpo":
                paired = [s for s in seeds if s in reference and value(s) is not None]
                row[column]["delta_vs_grpo"] = mean_interval(
                    [value(s) - value(s, of=reference) for s in paired if value(s, of=reference) is not None])
        table[method] = row
    return table


def aggregate(summaries: dict[str, dict[int, dict]]) -> dict:
    """Table 2 numbers from ``{method: {seed: run_summary}}``: greedy held-out accuracy (``table``) and, when
    every run logged it, the sampled one (``table_sampled``)."""
    tasks = sorted({t for runs in summaries.values() for s in runs.values() for t in s["per_task"]})
    reference = summaries.get("grpo")
    table = heldout_table(summaries, tasks)
    sampled = None
    if summaries and all(r.get("sampled") for runs in summaries.values() for r in runs.values()):
        sampled = heldout_table({m: {s: r["sampled"] for s, r in runs.items()} for m, runs in summaries.items()},
                                sorted({t for runs in summaries.values() for r in runs.values()
                                        for t in r["sampled"]["per_task"]}))
    def over_seeds(field: str, metrics: tuple[tuple[str, str], ...]) -> dict:
        """Per method and metric: mean and interval over seeds of the per-run ``field`` values (missing: skipped)."""
        return {method: {key: mean_interval([runs[s].get(field, {}).get(key) for s in sorted(runs)])
                         for key, _ in metrics} for method, runs in summaries.items()}

    training = {}
    for method, runs in summaries.items():
        seeds = [s for s in sorted(runs) if "training_accuracy" in runs[s]]
        training[method] = {key: mean_interval([runs[s]["training_accuracy"][key] for s in seeds])
                            for key in ("first", "last", "gain")}
        if reference is not None and method != "grpo":
            paired = [s for s in seeds if s in reference and "training_accuracy" in reference[s]]
            training[method]["last"]["delta_vs_grpo"] = mean_interval(
                [runs[s]["training_accuracy"]["last"] - reference[s]["training_accuracy"]["last"] for s in paired])
    return {"tasks": tasks, "table": table, "table_sampled": sampled, "mechanisms": over_seeds("mechanisms", MECHANISMS),
            "heldout_rationale": over_seeds("heldout_rationale", HELDOUT_RATIONALE),
            "ppo_update": over_seeds("ppo_update", PPO_UPDATE), "training_accuracy": training}


def _cell(stat: dict, delta: bool = False) -> str:
    if stat.get("mean") is None:
        return "-"
    sign = "+" if delta else ""
    text = f"{stat['mean']:{sign}.3f}"
    return text + (f" ± {stat['half_width']:.3f}" if stat.get("half_width") is not None else "")


def metric_table(stats: dict | None, metrics: tuple[tuple[str, str], ...], head: str, keep_empty: bool = False) -> list[str]:
    """Markdown lines (after a blank one) of ``{method: {key: stat}}`` with a column per metric; unless
    ``keep_empty``, a column no method has a value for is left out (runs from before the key was logged,
    ``eval_sampled/*`` without ``eval.samples``) and a table without columns is not written."""
    if not stats:
        return []
    columns = [(key, label) for key, label in metrics
               if keep_empty or any(row.get(key, {}).get("mean") is not None for row in stats.values())]
    if not columns:
        return []
    lines = ["", f"| {head} | " + " | ".join(label for _, label in columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for method, row in stats.items():
        lines.append("| " + " | ".join([method, *[_cell(row.get(key, {})) for key, _ in columns]]) + " |")
    return lines


def markdown_table(result: dict) -> str:
    tasks = result["tasks"]
    lines = []
    for key, what in (("table", "greedy"), ("table_sampled", "sampled, mean@N")):
        if not result.get(key):
            continue
        head = [f"method (held-out, {what})", *tasks, "macro avg", "Δ macro vs GRPO"]
        lines += ([""] if lines else []) + ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method, row in result[key].items():
            delta = row["macro"].get("delta_vs_grpo")
            cells = [method, *[_cell(row[t]) if t in row else "-" for t in tasks], _cell(row["macro"]),
                     _cell(delta, True) if delta else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += metric_table(result.get("heldout_rationale"), HELDOUT_RATIONALE, "method (held-out, final)")
    lines += metric_table(result["mechanisms"], MECHANISMS, "method", keep_empty=True)
    lines += metric_table(result.get("ppo_update"), PPO_UPDATE, "method (PPO update, mean over steps)")
    if result.get("training_accuracy"):
        lines += ["", f"| method | training accuracy, first {TRAIN_WINDOW} steps | last {TRAIN_WINDOW} steps | "
                      f"last - first | Δ last vs GRPO |", "|---|---|---|---|---|"]
        for method, stats in result["training_accuracy"].items():
            delta = stats["last"].get("delta_vs_grpo")
            lines.append("| " + " | ".join([method, _cell(stats["first"]), _cell(stats["last"]), _cell(stats["gain"], True),
                                            _cell(delta, True) if delta else "-"]) + " |")
    lines.append("")
    lines.append("Mean ± half-width of the 95% t-interval over seeds (n - 1 dof); Δ paired by seed.")
    return "\n".join(lines)


def band(curves: list[list[tuple[float, float]]], points: int = 50) -> dict:
    """Mean and 95% band of several (x, y) curves on a shared x grid (up to the shortest curve's end)."""
    import numpy as np

    curves = [sorted(c) for c in curves if c]
    if not curves:
        return {"x": [], "mean": [], "low": [], "high": []}
    end = min(c[-1][0] for c in curves)
    grid = np.linspace(0.0, end, points) if end > 0 else np.zeros(1)
    ys = np.array([np.interp(grid, [p[0] for p in c], [p[1] for p in c]) for c in curves])
    stats = [mean_interval(list(ys[:, i])) for i in range(len(grid))]
    fill = [(s["low"] if s["low"] is not None else s["mean"], s["high"] if s["high"] is not None else s["mean"]) for s in stats]
    return {"x": grid.tolist(), "mean": [s["mean"] for s in stats], "low": [f[0] for f in fill],
            "high": [f[1] for f in fill]}


def plot_curves(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, xlabel, ylabel, name in (("accuracy_vs_tokens", "decoded tokens", "held-out accuracy", "accuracy_vs_tokens.png"),
                                      ("sampled_accuracy_vs_tokens", "decoded tokens", "held-out accuracy (sampled, mean@N)",
                                       "sampled_accuracy_vs_tokens.png"),
                                      ("train_accuracy_vs_tokens", "decoded tokens",
                                       f"training accuracy ({SMOOTH}-step mean)", "train_accuracy_vs_tokens.png"),
                                      ("kl_per_step", "step", "KL to reference", "kl.png")):
        if not result["curves"].get(key):
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for method, curve in result["curves"][key].items():
            if not curve["x"]:
                continue
            line, = ax.plot(curve["x"], curve["mean"], label=method)
            ax.fill_between(curve["x"], curve["low"], curve["high"], color=line.get_color(), alpha=0.2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)
    return written


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="base YAML config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per method")
    parser.add_argument("--out", required=True, help="output directory (runs, table, JSON, PNGs)")
    parser.add_argument("--no-run", action="store_true",
                        help="never train here: only aggregate finished runs (and score them on --benchmarks)")
    parser.add_argument("--slurm", action="store_true", help="print one sbatch line per unfinished run and stop")
    parser.add_argument("--submit", action="store_true", help="with --slurm: submit them")
    parser.add_argument("--sbatch", default="examples/slurm/care_qwen2_5_vl_7b.sbatch",
                        help="sbatch script taking CONFIG from the environment and overrides as arguments")
    parser.add_argument("--benchmarks", default=None,
                        help="NAME=PATH[,NAME=PATH...]: score every finished run's final policy on the paper's "
                             "benchmarks under eval.protocol and write table1.md / table2.md")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after the flags
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    benchmarks = None
    if args.benchmarks:
        from care_megatron.evaluation.benchmark_eval import parse_benchmark_paths

        try:
            benchmarks = parse_benchmark_paths(args.benchmarks)
        except ValueError as exc:
            parser.error(str(exc))
        if not benchmarks:
            parser.error("--benchmarks: no NAME=PATH given")

    from care_megatron.config.loader import load_config

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_config(args.config, args.overrides)  # fails here, naming the field, on a bad override
    steps, prompts, group = base.train.steps, base.data.prompts_per_step, base.rollout.group_size
    if not base.train.eval_every:
        print("warning: train.eval_every=0: no held-out accuracy will be logged", file=sys.stderr)
    plan = [(m, s) for m in args.methods for s in range(args.seeds)]
    unfinished = [(m, s) for m, s in plan if not is_finished(run_dir(out, m, s), steps)]
    executed = []
    if args.slurm:
        for method, seed in unfinished:
            directory = run_dir(out, method, seed)
            line = sbatch_line(args.sbatch, args.config, run_overrides(args.overrides, method, seed, directory),
                               f"cmp-{method}-s{seed}", directory)
            print(line)
            if args.submit:
                directory.mkdir(parents=True, exist_ok=True)
                subprocess.run(shlex.split(line), check=True)
        if benchmarks:
            print("note: --benchmarks: the runs are scored by the aggregate call (without --slurm) once they finish",
                  file=sys.stderr)
        return {"sbatch": len(unfinished)}
    protocol = base.eval.protocol
    from care_megatron.evaluation.benchmark_eval import load_published, published_base

    model_name = " ".join(filter(None, (base.model.name, base.train.init_from)))
    matched = base.eval.published_base if base.eval.published_base != "auto" else \
        (published_base(model_name, load_published()) or "auto")
    scored: list[str] = []

    def score(method: str, seed: int) -> None:
        directory, target = run_dir(out, method, seed), bench_dir(out, protocol, method, seed)
        if not benchmarks or not is_finished(directory, steps) or \
                bench_finished(target, benchmarks, protocol, base.eval.seeds):
            return
        print(f"scoring {method} seed {seed} on {', '.join(benchmarks)} ({protocol}) -> {target}", flush=True)
        score_run(args.config, run_overrides(args.overrides, method, seed, directory), directory, target, benchmarks,
                  f"{method} seed{seed}", matched)
        scored.append(f"{method}/seed{seed}")

    if not args.no_run:
        for method, seed in unfinished:
            directory = run_dir(out, method, seed)
            print(f"running {method} seed {seed} -> {directory}", flush=True)
            run_locally(args.config, run_overrides(args.overrides, method, seed, directory), directory)
            executed.append(f"{method}/seed{seed}")
            score(method, seed)
    for method, seed in plan:  # finished elsewhere (earlier calls, --slurm jobs): scored here
        score(method, seed)
    summaries: dict[str, dict[int, dict]] = {}
    for method, seed in plan:
        directory = run_dir(out, method, seed)
        if is_finished(directory, steps):
            summaries.setdefault(method, {})[seed] = run_summary(read_rows(directory), prompts, group)
    result = aggregate(summaries)
    result["curves"] = {
        "accuracy_vs_tokens": {m: band([r["accuracy_curve"] for r in runs.values()]) for m, runs in summaries.items()},
        "kl_per_step": {m: band([r["kl_curve"] for r in runs.values()]) for m, runs in summaries.items()},
        "sampled_accuracy_vs_tokens": {m: band([r["sampled"]["accuracy_curve"] for r in runs.values()])
                                       for m, runs in summaries.items()} if result["table_sampled"] else {},
        "train_accuracy_vs_tokens": {m: band([r.get("train_accuracy_curve", []) for r in runs.values()])
                                     for m, runs in summaries.items()},
    }
    result.update(config=args.config, overrides=args.overrides, methods=args.methods, seeds=args.seeds, steps=steps,
                  executed=executed, runs={m: {str(s): r for s, r in runs.items()} for m, runs in summaries.items()})
    table = markdown_table(result)
    (out / "table.md").write_text(table + "\n")
    if benchmarks:
        bench: dict[str, dict[int, dict]] = {}
        for method, seed in plan:
            target = bench_dir(out, protocol, method, seed)
            if bench_finished(target, benchmarks, protocol, base.eval.seeds):
                bench.setdefault(method, {})[seed] = read_bench(target)
        names = [n for n in BENCHMARKS if n in benchmarks]
        result["table1"] = benchmark_tables(bench, names)
        result["table2"] = {m: result["table1"]["table"][m] for m in result["table1"]["table2_methods"]}
        result["scored"] = scored
        tables = {"table1.md": table1_markdown(result["table1"], model_name, matched)}
        if result["table1"]["table2_methods"]:
            tables["table2.md"] = table2_markdown(result["table1"])
        for name, text in tables.items():
            for folder in (out, out / "bench" / protocol):
                folder.mkdir(parents=True, exist_ok=True)
                (folder / name).write_text(text)
        table += "\n\n" + "\n\n".join(tables.values())
    result["pngs"] = [str(p) for p in plot_curves(result, out)]
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    print(table)
    return result


if __name__ == "__main__":
    main()
