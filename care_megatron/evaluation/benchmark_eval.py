"""Benchmark evaluation: scored by each benchmark's rules, reported as the paper's Table 1.

Two protocols (``eval.protocol``):

* ``greedy`` (the default): one greedy decode per example;
* ``paper``: ``eval.seeds`` decodes per example at the rollout's sampling settings (temperature,
  top-p, top-k), decode ``k`` of every example drawn with the sampling seed :func:`decode_seed` derives
  from ``train.seed`` and ``k``; a benchmark's accuracy is the mean over the seeds of the per-seed
  accuracies, reported with a 95% Student-t interval over those per-seed accuracies (n - 1 dof)
  beside the bootstrap interval over examples.

:func:`evaluate_benchmarks` decodes every record of each requested benchmark (once per seed) through any
:class:`~care_megatron.rollout.base.RolloutEngine` (it batches; a batch holds decodes of one seed
index), scores the ``<answer>`` span with
:func:`~care_megatron.evaluation.benchmarks.score_benchmark_detail`, and appends one JSON line per
decode to ``<output_dir>/<benchmark>.jsonl`` (id, seed index, prompt, response, extracted answer,
score, reason). A re-run with the same output directory skips the (id, seed) pairs already in those
files (resume), and refuses to mix protocols or decoding parameters: they are stored once in
``decoding.json``.

:func:`summarise` turns the JSONL files into per-benchmark accuracy with a 95% bootstrap confidence
interval (resampling examples; under ``paper`` an example's score is its mean over the seeds), the
t-interval over seeds under ``paper``, the macro average over the benchmarks (with its own intervals:
the bootstrap resamples every benchmark independently; the t-interval is over the per-seed macro
averages), a markdown table in the layout of the paper's Table 1 beside the paper's published rows
(``published_table1.json``) naming the protocol, and a bar chart with the intervals.
"""
from __future__ import annotations

import dataclasses
import hashlib
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

from care_megatron.config.schema import EVAL_PROTOCOLS, ConfigError
from care_megatron.data.prompting import build_prompt, system_prompt_for
from care_megatron.data.schema import Record
from care_megatron.evaluation.benchmarks import (
    BENCHMARKS, Judge, benchmark_prompt, load_benchmark_with_report, score_benchmark_detail,
)
from care_megatron.rewards.parsing import DEFAULT_TAGS, TagConfig, regions_from_token_ids
from care_megatron.rollout.base import GenerationRequest, RolloutEngine, SamplingParams, strip_stop_token
from care_megatron.stats import mean_interval

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


def decode_seed(base_seed: Optional[int], index: int, batch: Optional[int] = None) -> int:
    """The sampling seed of decode ``index`` (0-based seed index) under ``eval.protocol: paper``, derived
    from the run's ``train.seed`` (``base_seed``): the first 31 bits of SHA-256 of ``"<base>/<index>"``.
    With ``batch``, the seed of the ``batch``-th engine call of that seed index (``"<base>/<index>/<batch>"``),
    so two calls of one seed index do not draw the same random stream; a resumed evaluation numbers its
    calls anew, so its remaining decodes are fresh draws, not those the interrupted run would have made."""
    text = f"{0 if base_seed is None else int(base_seed)}/{int(index)}" + ("" if batch is None else f"/{int(batch)}")
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


def _decoding_record(sampling: SamplingParams, judge_name: Optional[str], model: str, protocol: str = "greedy",
                     seeds: int = 1, tags: TagConfig = DEFAULT_TAGS) -> dict:
    paper = protocol == "paper"
    record = {"protocol": protocol, "temperature": sampling.temperature, "top_p": sampling.top_p,
              "top_k": sampling.top_k, "max_new_tokens": sampling.max_new_tokens, "seed": sampling.seed,
              "seeds": seeds, "decode_seeds": [decode_seed(sampling.seed, k) for k in range(seeds)] if paper else None,
              "decodes_per_example": seeds, "judge": judge_name, "model": model}
    if tags != DEFAULT_TAGS:  # only then, so result folders written before data.think_tag existed still resume
        record["think_tag"] = tags.think_tag
    return record


def _previous_decoding(path: Path) -> dict:
    """``decoding.json`` as written; one from before ``eval.protocol`` existed was the greedy protocol."""
    previous = json.loads(path.read_text())
    previous.setdefault("protocol", "greedy")
    previous.setdefault("seeds", previous.get("decodes_per_example", 1))
    previous.setdefault("decode_seeds", None)
    return previous


def protocol_sentence(decoding: dict, intervals: bool = True) -> str:
    """One sentence naming the evaluation protocol of ``decoding`` (a ``decoding.json`` record) and how the
    accuracy (and, with ``intervals``, its intervals) is formed, for the tables."""
    if decoding.get("protocol", "greedy") != "paper":
        return "Protocol: greedy — one greedy decode per example" + (
            "; accuracy in percent with [its 95% bootstrap interval over examples]." if intervals else ".")
    seeds = int(decoding.get("seeds", 1))
    knobs = [f"temperature {decoding.get('temperature')}", f"top-p {decoding.get('top_p')}"]
    if decoding.get("top_k") not in (None, -1, 0):
        knobs.append(f"top-k {decoding.get('top_k')}")
    head = f"Protocol: paper — {', '.join(knobs)}, {seeds} seed{'s' if seeds != 1 else ''} per example; "
    if not intervals:
        return head + "accuracy = mean over seeds."
    interval = (f"± the half-width of the 95% Student-t interval over the {seeds} per-seed accuracies "
                f"({seeds - 1} dof), " if seeds > 1 else "(no t-interval with one seed), ")
    return (head + f"accuracy in percent = mean over seeds {interval}and [the 95% bootstrap interval over "
            "examples (an example's score: its mean over the seeds)].")


def _check_decoding(out: Path, decoding: dict) -> None:
    """Refuse an output directory holding results of another protocol, decoding or model."""
    path = out / "decoding.json"
    if not path.exists():
        return
    previous = _previous_decoding(path)
    if previous["protocol"] != decoding["protocol"]:
        raise ConfigError("eval.protocol", f"{out} holds results of the {previous['protocol']} protocol "
                          f"({previous['seeds']} decode(s) per example); this run uses eval.protocol="
                          f"{decoding['protocol']}. Use another eval.output_dir (results of two protocols must "
                          "not be mixed in), or the protocol of that folder.")
    if previous != decoding:
        raise ConfigError("eval.output_dir", f"{out} holds results of {previous}; this run is {decoding}. Use "
                          "another eval.output_dir (results of another model or decoding must not be mixed in).")


def evaluate_benchmarks(engine: RolloutEngine, tokenizer, image_processor, benchmarks: dict[str, str],
                        output_dir: str | os.PathLike, sampling: SamplingParams, batch_size: int = 16,
                        limit: Optional[int] = None, judge: Optional[Judge] = None, judge_name: Optional[str] = None,
                        model_name: str = "", progress: bool = True, label: str = "ours",
                        published_base_model: str = "auto", protocol: str = "greedy",
                        seeds: int = 1, tags: TagConfig = DEFAULT_TAGS) -> "BenchmarkReport":
    """Decode and score every not-yet-scored (example, seed index) of ``benchmarks`` (name -> path); return
    the summary.

    ``protocol`` ``greedy``: one decode per example with ``sampling`` as given (the caller passes
    temperature 0), ``seeds`` is ignored. ``paper``: ``seeds`` decodes per example with ``sampling``'s
    temperature / top-p / top-k; the engine calls of seed index ``k`` use the seeds
    ``decode_seed(sampling.seed, k, call)``. ``tags``: the run's tags (``data.think_tag``) for the
    instruction and the answer span.
    """
    if protocol not in EVAL_PROTOCOLS:
        raise ConfigError("eval.protocol", f"must be {' or '.join(EVAL_PROTOCOLS)}, got {protocol!r}")
    seeds = int(seeds) if protocol == "paper" else 1
    if seeds < 1:
        raise ConfigError("eval.seeds", f"must be >= 1, got {seeds}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    decoding = _decoding_record(sampling, judge_name, model_name, protocol, seeds, tags)
    _check_decoding(out, decoding)
    (out / "decoding.json").write_text(json.dumps(decoding, indent=1))
    loaded, skipped, pending = {}, {}, {k: [] for k in range(seeds)}
    for name, path in benchmarks.items():
        records, report = load_benchmark_with_report(name, path, limit)
        if report.num_skipped:
            logger.warning("%s", report.summary())
        _end_cut_line(out / f"{name}.jsonl")
        done = {(row["id"], _seed_index(row)) for row in _read_jsonl(out / f"{name}.jsonl")}
        loaded[name] = [r.id for r in records]
        skipped[name] = dict(report.skipped)
        for k in range(seeds):
            pending[k].extend((name, r) for r in records if (r.id, k) not in done)
    bar = tqdm(total=sum(len(v) for v in pending.values()), desc="benchmarks", disable=not progress)
    for k, items in pending.items():  # a batch never mixes seed indices: one sampling seed per engine call
        for call, start in enumerate(range(0, len(items), batch_size)):
            chunk = items[start:start + batch_size]
            call_sampling = sampling if protocol == "greedy" else \
                dataclasses.replace(sampling, seed=decode_seed(sampling.seed, k, call))
            lines: dict[str, list[str]] = {}
            for name, row in decode_and_score(engine, tokenizer, image_processor, chunk, call_sampling, judge,
                                                  tags):
                row = {"id": row["id"], "seed": k, **({"sampling_seed": call_sampling.seed} if protocol == "paper"
                                                      else {}), **row}
                lines.setdefault(name, []).append(json.dumps(row, ensure_ascii=False))
            for name, rows in lines.items():
                with open(out / f"{name}.jsonl", "a", encoding="utf-8") as handle:
                    handle.write("\n".join(rows) + "\n")
            bar.update(len(chunk))
    bar.close()
    report = summarise(out, {name: loaded[name] for name in benchmarks}, skipped, decoding)
    report.write(out, label=label, base_model=published_base_model)
    return report


def _end_cut_line(path: Path) -> None:
    """End a last line cut by a kill mid-write, so that the rows appended next start on a line of their own."""
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as handle:
            handle.seek(-1, os.SEEK_END)
            complete = handle.read(1) == b"\n"
        if not complete:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write("\n")


def _seed_index(row: dict) -> int:
    """The seed index of a JSONL row (rows written before ``eval.protocol`` existed are greedy: 0)."""
    return int(row.get("seed", 0))


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
    """Examples scored (under ``paper``: with at least one seed scored)."""
    accuracy: float
    """Mean over the seed indices of the per-seed accuracies (greedy: the accuracy of the one decode)."""
    ci_low: float
    ci_high: float
    """95% bootstrap interval over examples (an example's score: its mean over the seeds)."""
    skipped: dict[str, int] = field(default_factory=dict)
    seeds: int = 1
    per_seed: list[float] = field(default_factory=list)
    """Accuracy of each seed index (one value under ``greedy``)."""
    t_low: Optional[float] = None
    t_high: Optional[float] = None
    t_half_width: Optional[float] = None
    """95% Student-t interval of the mean over the per-seed accuracies (n - 1 dof; None under fewer than 2 seeds)."""


@dataclass
class BenchmarkReport:
    results: dict[str, BenchmarkResult]
    macro_accuracy: float
    macro_ci: tuple[float, float]
    decoding: dict
    macro_over: list[str] = field(default_factory=list)
    macro_per_seed: list[float] = field(default_factory=list)
    """Per seed index, the mean over ``macro_over`` of the benchmarks' accuracies at that seed."""
    macro_t_ci: Optional[tuple[float, float]] = None
    macro_t_half_width: Optional[float] = None
    """95% Student-t interval over ``macro_per_seed`` (None under fewer than 2 seeds)."""

    @property
    def protocol(self) -> str:
        return self.decoding.get("protocol", "greedy")

    def to_dict(self) -> dict:
        return {"results": {k: asdict(v) for k, v in self.results.items()}, "macro_accuracy": self.macro_accuracy,
                "macro_ci": list(self.macro_ci), "macro_over": self.macro_over, "macro_per_seed": self.macro_per_seed,
                "macro_t_ci": None if self.macro_t_ci is None else list(self.macro_t_ci),
                "macro_t_half_width": self.macro_t_half_width, "protocol": self.protocol, "decoding": self.decoding}

    def to_markdown(self, label: str = "ours", published: Optional[dict] = None, base_model: str = "auto") -> str:
        """The paper's Table 1 layout (percent, one decimal), the paper's rows for the same base model, then ours."""
        names = list(BENCHMARKS)
        paper_rows, paper_note = published_rows(self.decoding.get("model", ""), base_model, published)
        lines = [table_header(), *paper_rows]
        cells = []
        for n in names:
            r = self.results.get(n)
            cells.append("—" if r is None or r.n == 0 else _accuracy_cell(r.accuracy, r.t_half_width, (r.ci_low, r.ci_high)))
        macro = "—" if math.isnan(self.macro_accuracy) else \
            _accuracy_cell(self.macro_accuracy, self.macro_t_half_width, self.macro_ci)
        if len(self.macro_over) not in (0, len(names)):
            macro += f" (over {len(self.macro_over)})"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {macro} |")
        notes = [protocol_sentence(self.decoding),
                 "n = " + ", ".join(f"{n} {self.results[n].n}" for n in names if n in self.results) + ".",
                 paper_note,
                 "Decoding: " + ", ".join(f"{k}={v}" for k, v in self.decoding.items()) + "."]
        return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"

    def write(self, out: Path, label: str = "ours", base_model: str = "auto") -> None:
        (out / "summary.json").write_text(json.dumps(self.to_dict(), indent=1))
        (out / "table.md").write_text(self.to_markdown(label, base_model=base_model))
        plot_benchmarks(self, out / "benchmarks.png", label)


def _t_interval(values: list[float], paper: bool) -> tuple[Optional[float], Optional[float], Optional[float]]:
    stat = mean_interval(values) if paper else {"low": None, "high": None, "half_width": None}
    return stat["low"], stat["high"], stat["half_width"]


def summarise(out: Path, ids: dict[str, list[str]], skipped: dict[str, dict], decoding: dict,
              samples: int = 1000, seed: int = 0) -> BenchmarkReport:
    """Accuracy, intervals and macro average from the JSONL files, for the ids of this run's records and the
    seed indices ``0 .. decoding["seeds"] - 1``."""
    paper = decoding.get("protocol", "greedy") == "paper"
    seeds = int(decoding.get("seeds", 1)) if paper else 1
    results: dict[str, BenchmarkResult] = {}
    per_benchmark: dict[str, np.ndarray] = {}
    for name, wanted in ids.items():
        wanted_set = set(wanted)
        scores = {(row["id"], _seed_index(row)): float(row["score"]) for row in _read_jsonl(out / f"{name}.jsonl")
                  if row["id"] in wanted_set and _seed_index(row) < seeds}
        per_seed = []
        for k in range(seeds):
            at_k = [scores[(i, k)] for i in wanted if (i, k) in scores]
            if at_k:
                per_seed.append(float(np.mean(at_k)))
        values = []  # per example: its mean over the seeds scored
        for i in wanted:
            mine = [scores[(i, k)] for k in range(seeds) if (i, k) in scores]
            if mine:
                values.append(float(np.mean(mine)))
        low, high = bootstrap_interval(values, samples, seed)
        t_low, t_high, t_half = _t_interval(per_seed, paper)
        accuracy = float(np.mean(per_seed)) if per_seed else math.nan
        results[name] = BenchmarkResult(name, len(values), accuracy, low, high, skipped.get(name, {}), seeds,
                                        per_seed, t_low, t_high, t_half)
        if values:
            per_benchmark[name] = np.asarray(values, dtype=np.float64)
    over = [n for n in BENCHMARKS if n in per_benchmark]
    macro_per_seed: list[float] = []
    if over and all(len(results[n].per_seed) == seeds for n in over):
        macro_per_seed = [float(np.mean([results[n].per_seed[k] for n in over])) for k in range(seeds)]
    t_low, t_high, macro_t_half = _t_interval(macro_per_seed, paper)
    macro_t_ci = None if t_low is None else (t_low, t_high)
    if over:
        macro = float(np.mean([results[n].accuracy for n in over]))
        rng = np.random.default_rng(seed)
        resampled = np.stack([per_benchmark[n][rng.integers(0, len(per_benchmark[n]), size=(samples, len(per_benchmark[n])))]
                              .mean(axis=1) for n in over]).mean(axis=0)
        macro_ci = (float(np.quantile(resampled, 0.025)), float(np.quantile(resampled, 0.975)))
    else:
        macro, macro_ci = math.nan, (math.nan, math.nan)
    return BenchmarkReport(results, macro, macro_ci, decoding, over, macro_per_seed, macro_t_ci, macro_t_half)


def _accuracy_cell(accuracy: float, t_half_width: Optional[float], bootstrap: tuple[float, float]) -> str:
    """``mean [bootstrap low, high]`` in percent; under the paper protocol ``mean ± t half-width [low, high]``."""
    text = f"{100 * accuracy:.1f}"
    if t_half_width is not None:
        text += f" ± {100 * t_half_width:.1f}"
    return text + f" [{100 * bootstrap[0]:.1f}, {100 * bootstrap[1]:.1f}]"


def table_header(first: str = "Model") -> str:
    """The header and rule of the paper's Table 1 layout (six benchmarks and their average)."""
    names = list(BENCHMARKS)
    return (f"| {first} | " + " | ".join(COLUMN_TITLES[n] for n in names) + " | Avg. |\n"
            + "|---" * (len(names) + 2) + "|")


def published_rows(model_name: str, base_model: str = "auto", published: Optional[dict] = None) -> tuple[list[str], str]:
    """The paper's Table 1 rows (markdown, percent, one decimal) for the base model ``base_model`` (``auto``:
    the one whose name appears in ``model_name``; none matching: the paper's headline base), and the note
    naming their source and the base shown."""
    names = list(BENCHMARKS)
    table = published if published is not None else load_published()
    base = published_base(model_name, table) if base_model == "auto" else base_model
    shown = base or DEFAULT_PUBLISHED_BASE
    lines = []
    for row in table["rows"]:
        if row["base"] != shown:
            continue
        values = [row["scores"].get(n) for n in names]
        avg = sum(values) / len(values) if all(v is not None for v in values) else None
        cells = ["—" if v is None else f"{v:.1f}" for v in values] + ["—" if avg is None else f"{avg:.1f}"]
        lines.append(f"| {row['model']} (paper) | " + " | ".join(cells) + " |")
    note = f"Paper rows: {table['source']}" + (f" Base model {base}." if base else
                                               f" No base model of the paper matches ours; its {shown} rows are shown for reference.")
    return lines, note


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
    how = "one greedy decode per example" if report.protocol != "paper" else \
        f"mean of {report.decoding.get('seeds')} sampled decodes per example"
    ax.set_title(f"{label}: {how}, 95% bootstrap intervals", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
