"""Benchmark evaluation: one decode per example, scored by each benchmark's rules, reported as the paper's Table 1.

:func:`evaluate_benchmarks` decodes every record of each requested benchmark once through any
:class:`~care_megatron.rollout.base.RolloutEngine` (it batches), scores the ``<answer>`` span with
:func:`~care_megatron.evaluation.benchmarks.score_benchmark_detail`, and appends one JSON line per
example to ``<output_dir>/<benchmark>.jsonl`` (id, prompt, response, extracted answer, score, reason).
A re-run with the same output directory skips the examples already in those files (resume), and
refuses to mix decoding parameters: they are stored once in ``decoding.json``.

:func:`summarise` turns the JSONL files into per-benchmark accuracy with a 95% bootstrap confidence
interval, the macro average over the benchmarks (with its own interval, resampling every benchmark
independently), a markdown table in the layout of the paper's Table 1 beside the paper's published
rows (``published_table1.json``), and a bar chart with the intervals.
"""
from __future__ import annotations

import importlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from care_megatron.data.prompting import build_prompt, system_prompt_for
from care_megatron.data.schema import Record
from care_megatron.evaluation.benchmarks import (
    BENCHMARKS, Judge, benchmark_prompt, load_benchmark_with_report, score_benchmark_detail,
)
from care_megatron.rewards.parsing import DEFAULT_TAGS, TagConfig, regions_from_token_ids
from care_megatron.rollout.base import GenerationRequest, RolloutEngine, SamplingParams, strip_stop_token

logger = logging.getLogger(__name__)

PUBLISHED_TABLE = Path(__file__).with_name("published_table1.json")
"""The paper's Table 1 numbers (data, with their source)."""

DEFAULT_PUBLISHED_BASE = "Qwen2.5-VL-7B"
"""The paper's headline base model: its rows are shown when ours matches none of the paper's bases."""

COLUMN_TITLES = {
    "mathvista": "MathVista<sub>mini</sub>",
    "mathverse": "MathVerse<sub>mini</sub>",
    "mathvision": "MATH-Vision<sub>full</sub>",
    "mmmu": "MMMU<sub>val</sub>",
    "mmmu_pro_standard": "MMMU-Pro<sub>standard</sub>",
    "mmmu_pro_vision": "MMMU-Pro<sub>vision</sub>",
}


def parse_benchmark_paths(text: str) -> dict[str, str]:
    """``"mathvista=/d/MathVista,mmmu=/d/MMMU"`` -> ``{"mathvista": "/d/MathVista", "mmmu": "/d/MMMU"}``."""
    paths: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, path = item.partition("=")
        name = name.strip()
        if not sep or not path.strip():
            raise ValueError(f"--benchmarks item {item!r} must look like NAME=PATH")
        if name not in BENCHMARKS:
            raise ValueError(f"--benchmarks: unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
        paths[name] = path.strip()
    return paths


def load_judge(spec: str) -> tuple[Judge, str]:
    """``"package.module:function"`` -> the callable ``function(question, key, extracted) -> float`` and its name."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"config field 'eval.judge': {spec!r} must look like package.module:function")
    try:
        judge = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"config field 'eval.judge': cannot import {spec!r}: {exc}") from exc
    if not callable(judge):
        raise ValueError(f"config field 'eval.judge': {spec!r} is not callable")
    return judge, spec


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    if not path.exists():
        return rows
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill mid-write: that example is decoded again
            if isinstance(row, dict) and "id" in row:
                rows.append(row)
    return rows


def _decoding_record(sampling: SamplingParams, judge_name: Optional[str], model: str,
                     tags: TagConfig = DEFAULT_TAGS) -> dict:
    record = {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
              "max_new_tokens": sampling.max_new_tokens, "seed": sampling.seed, "decodes_per_example": 1,
              "judge": judge_name, "model": model}
    if tags != DEFAULT_TAGS:  # only then, so result folders written before data.think_tag existed still resume
        record["think_tag"] = tags.think_tag
    return record


def evaluate_benchmarks(engine: RolloutEngine, tokenizer, image_processor, benchmarks: dict[str, str],
                        output_dir: str | os.PathLike, sampling: SamplingParams, batch_size: int = 16,
                        limit: Optional[int] = None, judge: Optional[Judge] = None, judge_name: Optional[str] = None,
                        model_name: str = "", progress: bool = True, label: str = "ours",
                        published_base_model: str = "auto", tags: TagConfig = DEFAULT_TAGS) -> "BenchmarkReport":
    """Decode and score every not-yet-scored example of ``benchmarks`` (name -> path); return the summary.
    ``tags``: the run's tags (``data.think_tag``) for the instruction and the answer span."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    decoding = _decoding_record(sampling, judge_name, model_name, tags)
    decoding_path = out / "decoding.json"
    if decoding_path.exists():
        previous = json.loads(decoding_path.read_text())
        if previous != decoding:
            raise ValueError(f"{out} holds results of {previous}; this run is {decoding}. Use another "
                             "eval.output_dir (results of another model or decoding must not be mixed in).")
    decoding_path.write_text(json.dumps(decoding, indent=1))
    loaded, skipped, pending = {}, {}, []
    for name, path in benchmarks.items():
        records, report = load_benchmark_with_report(name, path, limit)
        if report.num_skipped:
            logger.warning("%s", report.summary())
        done = {row["id"] for row in _read_jsonl(out / f"{name}.jsonl")}
        loaded[name] = [r.id for r in records]
        skipped[name] = dict(report.skipped)
        pending.extend((name, r) for r in records if r.id not in done)
    bar = tqdm(total=len(pending), desc="benchmarks", disable=not progress)
    for start in range(0, len(pending), batch_size):
        chunk = pending[start:start + batch_size]
        lines: dict[str, list[str]] = {}
        for name, row in decode_and_score(engine, tokenizer, image_processor, chunk, sampling, judge, tags):
            lines.setdefault(name, []).append(json.dumps(row, ensure_ascii=False))
        for name, rows in lines.items():
            with open(out / f"{name}.jsonl", "a", encoding="utf-8") as handle:
                handle.write("\n".join(rows) + "\n")
        bar.update(len(chunk))
    bar.close()
    report = summarise(out, {name: loaded[name] for name in benchmarks}, skipped, decoding)
    report.write(out, label=label, base_model=published_base_model)
    return report


def decode_and_score(engine: RolloutEngine, tokenizer, image_processor, items: list[tuple[str, Record]],
                     sampling: SamplingParams, judge: Optional[Judge] = None, tags: TagConfig = DEFAULT_TAGS):
    """One engine call for ``items`` ((benchmark, record) pairs); yields ``(benchmark, per-example row)`` in order.
    The prompts carry the package's instruction for ``tags`` (``data.think_tag``), which also read the responses."""
    stop_ids = set(sampling.stop_token_ids)
    system_prompt = system_prompt_for(tags)
    prompts = [build_prompt(benchmark_prompt(r), r.images, tokenizer, image_processor, system_prompt=system_prompt)
               for _, r in items]
    requests = [GenerationRequest(request_id=r.id, prompt_ids=p.prompt_ids, prompt_text=p.prompt_text,
                                  images=p.images, pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw)
                for (_, r), p in zip(items, prompts)]
    completions = engine.generate(requests, sampling)
    for (name, record), prompt, completion in zip(items, prompts, completions):
        # The response text as the trainer reads it (stop token dropped, byte-exact decode).
        body = strip_stop_token(list(completion.token_ids), stop_ids)
        response = regions_from_token_ids(body, tokenizer, tags)[1].text
        scored = score_benchmark_detail(name, record, response, judge=judge, tags=tags)
        yield name, {"id": record.id, "prompt": prompt.prompt_text, "response": response, "key": record.answer,
                     "extracted": scored.extracted, "score": scored.score, "reason": scored.reason,
                     "finish_reason": completion.finish_reason}


class TrainingBenchmarkSubset:
    """Training-time evaluation on a small fixed subset: the first ``eval.train_subset`` usable examples of
    each ``eval.benchmarks`` entry, loaded once, decoded greedily at every ``train.eval_every``; nothing written.
    """

    def __init__(self, benchmarks: dict[str, str], per_benchmark: int, batch_size: int = 16,
                 tags: TagConfig = DEFAULT_TAGS):
        self.batch_size = batch_size
        self.tags = tags
        self.items = [(name, record) for name, path in benchmarks.items()
                      for record in load_benchmark_with_report(name, path, per_benchmark)[0]]

    @classmethod
    def from_config(cls, config) -> Optional["TrainingBenchmarkSubset"]:
        if not (config.eval.train_subset and config.eval.benchmarks):
            return None
        return cls(config.eval.benchmarks, config.eval.train_subset, config.rollout.batch_size, config.data.tag_config)

    def metrics(self, engine: RolloutEngine, tokenizer, image_processor, sampling: SamplingParams,
                prefix: str = "bench/") -> dict[str, float]:
        """``{prefix}<benchmark>``: accuracy on the subset; ``{prefix}macro``: their mean."""
        scores: dict[str, list[float]] = {}
        for start in range(0, len(self.items), self.batch_size):
            for name, row in decode_and_score(engine, tokenizer, image_processor,
                                              self.items[start:start + self.batch_size], sampling, tags=self.tags):
                scores.setdefault(name, []).append(row["score"])
        out = {f"{prefix}{name}": float(np.mean(values)) for name, values in scores.items()}
        if scores:
            out[f"{prefix}macro"] = float(np.mean([np.mean(v) for v in scores.values()]))
        return out


def bootstrap_interval(scores: list[float], samples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``scores`` (resampling examples with replacement)."""
    if not scores:
        return (math.nan, math.nan)
    values = np.asarray(scores, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


@dataclass
class BenchmarkResult:
    name: str
    n: int
    accuracy: float
    ci_low: float
    ci_high: float
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass
class BenchmarkReport:
    results: dict[str, BenchmarkResult]
    macro_accuracy: float
    macro_ci: tuple[float, float]
    decoding: dict
    macro_over: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"results": {k: asdict(v) for k, v in self.results.items()}, "macro_accuracy": self.macro_accuracy,
                "macro_ci": list(self.macro_ci), "macro_over": self.macro_over, "decoding": self.decoding}

    def to_markdown(self, label: str = "ours", published: Optional[dict] = None, base_model: str = "auto") -> str:
        """The paper's Table 1 layout (percent, one decimal), the paper's rows for the same base model, then ours."""
        names = list(BENCHMARKS)
        header = "| Model | " + " | ".join(COLUMN_TITLES[n] for n in names) + " | Avg. |"
        lines = [header, "|---" * (len(names) + 2) + "|"]
        table = published if published is not None else load_published()
        base = published_base(self.decoding.get("model", ""), table) if base_model == "auto" else base_model
        shown = base or DEFAULT_PUBLISHED_BASE
        for row in table["rows"]:
            if row["base"] != shown:
                continue
            values = [row["scores"].get(n) for n in names]
            avg = sum(values) / len(values) if all(v is not None for v in values) else None
            cells = ["—" if v is None else f"{v:.1f}" for v in values] + ["—" if avg is None else f"{avg:.1f}"]
            lines.append(f"| {row['model']} (paper) | " + " | ".join(cells) + " |")
        cells = []
        for n in names:
            r = self.results.get(n)
            cells.append("—" if r is None or r.n == 0 else
                         f"{100 * r.accuracy:.1f} [{100 * r.ci_low:.1f}, {100 * r.ci_high:.1f}]")
        macro = "—" if math.isnan(self.macro_accuracy) else \
            f"{100 * self.macro_accuracy:.1f} [{100 * self.macro_ci[0]:.1f}, {100 * self.macro_ci[1]:.1f}]"
        if len(self.macro_over) not in (0, len(names)):
            macro += f" (over {len(self.macro_over)})"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {macro} |")
        notes = [f"Accuracy in percent; ours with its 95% bootstrap interval; n = "
                 + ", ".join(f"{n} {self.results[n].n}" for n in names if n in self.results) + ".",
                 f"Paper rows: {table['source']}" + (f" Base model {base}." if base else
                                                      f" No base model of the paper matches ours; its {shown} rows are shown for reference."),
                 "Decoding: " + ", ".join(f"{k}={v}" for k, v in self.decoding.items()) + "."]
        return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"

    def write(self, out: Path, label: str = "ours", base_model: str = "auto") -> None:
        (out / "summary.json").write_text(json.dumps(self.to_dict(), indent=1))
        (out / "table.md").write_text(self.to_markdown(label, base_model=base_model))
        plot_benchmarks(self, out / "benchmarks.png", label)


def summarise(out: Path, ids: dict[str, list[str]], skipped: dict[str, dict], decoding: dict,
              samples: int = 1000, seed: int = 0) -> BenchmarkReport:
    """Accuracy, bootstrap interval and macro average from the JSONL files, for the ids of this run's records."""
    results: dict[str, BenchmarkResult] = {}
    per_benchmark: dict[str, np.ndarray] = {}
    for name, wanted in ids.items():
        wanted_set = set(wanted)
        scores = {row["id"]: float(row["score"]) for row in _read_jsonl(out / f"{name}.jsonl") if row["id"] in wanted_set}
        values = [scores[i] for i in wanted if i in scores]
        low, high = bootstrap_interval(values, samples, seed)
        results[name] = BenchmarkResult(name, len(values), float(np.mean(values)) if values else math.nan, low, high,
                                        skipped.get(name, {}))
        if values:
            per_benchmark[name] = np.asarray(values, dtype=np.float64)
    over = [n for n in BENCHMARKS if n in per_benchmark]
    if over:
        macro = float(np.mean([per_benchmark[n].mean() for n in over]))
        rng = np.random.default_rng(seed)
        resampled = np.stack([per_benchmark[n][rng.integers(0, len(per_benchmark[n]), size=(samples, len(per_benchmark[n])))]
                              .mean(axis=1) for n in over]).mean(axis=0)
        macro_ci = (float(np.quantile(resampled, 0.025)), float(np.quantile(resampled, 0.975)))
    else:
        macro, macro_ci = math.nan, (math.nan, math.nan)
    return BenchmarkReport(results, macro, macro_ci, decoding, over)


def load_published(path: str | os.PathLike = PUBLISHED_TABLE) -> dict:
    """The paper's published Table 1 rows: ``{"source": ..., "rows": [{"model", "base", "scores"}]}``."""
    return json.loads(Path(path).read_text())


def published_base(model_name: str, table: dict) -> Optional[str]:
    """The paper's base model whose name appears in ``model_name`` (e.g. a path ending in Qwen2.5-VL-7B-Instruct)."""
    folded = model_name.lower().replace("_", "-")
    bases = sorted({row["base"] for row in table["rows"] if row["base"]}, key=len, reverse=True)
    return next((b for b in bases if b.lower() in folded), None)


def plot_benchmarks(report: BenchmarkReport, path: Path, label: str = "ours") -> Path:
    """Bar chart of the per-benchmark accuracies (and the macro average) with their 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in BENCHMARKS if n in report.results and report.results[n].n]
    values = [100 * report.results[n].accuracy for n in names]
    lows = [100 * (report.results[n].accuracy - report.results[n].ci_low) for n in names]
    highs = [100 * (report.results[n].ci_high - report.results[n].accuracy) for n in names]
    if names and not math.isnan(report.macro_accuracy):
        names.append("macro avg")
        values.append(100 * report.macro_accuracy)
        lows.append(100 * (report.macro_accuracy - report.macro_ci[0]))
        highs.append(100 * (report.macro_ci[1] - report.macro_accuracy))
    fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(names) + 1), 3.6))
    ax.bar(range(len(names)), values, yerr=[lows, highs], capsize=4, color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{label}: one decode per example, 95% bootstrap intervals", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
