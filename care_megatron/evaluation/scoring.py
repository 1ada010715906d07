"""Single-decode evaluation: one response per question, exact match on the answer span, per-source report.

Beside accuracy it reports format validity and the mean number of ``<think>`` tokens, counted as training
counts them (``Rollout.think_length``: response tokens in ``Region.THINK``, read with the reward function's
tags, so ``<reasoning>`` under ``data.think_tag: reasoning``), so a policy that keeps its accuracy by
dropping its rationale shows up in the held-out numbers too."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from care_megatron.data.prompting import SYSTEM_PROMPT, build_prompt
from care_megatron.rewards.parsing import regions_from_token_ids
from care_megatron.rewards.regions import Region
from care_megatron.rewards.registry import reward_tags
from care_megatron.rollout.base import GenerationRequest, RolloutEngine, SamplingParams, strip_stop_token


@dataclass
class EvalReport:
    """Accuracy, format rate and mean think length overall and per source, accuracy macro-averaged over
    sources, plus samples."""

    accuracy: float
    format_rate: float
    macro_accuracy: float
    per_source: dict[str, dict[str, float]]
    num_examples: int
    think_length: float
    """Mean number of response tokens in the ``<think>`` span (tags included), over all examples."""
    samples: list[dict] = field(default_factory=list)
    protocol: str = "greedy"
    """``greedy``: one decode per question; ``paper``: the numbers above are means over ``per_seed_accuracy``'s seeds."""
    per_seed_accuracy: list[float] = field(default_factory=list)
    per_seed_macro_accuracy: list[float] = field(default_factory=list)
    """Under ``paper``: accuracy / macro accuracy of each seed index."""

    def as_metrics(self, prefix: str = "eval/") -> dict[str, float]:
        out = {f"{prefix}accuracy": self.accuracy, f"{prefix}format": self.format_rate,
               f"{prefix}macro_accuracy": self.macro_accuracy, f"{prefix}think_length": self.think_length}
        for source, stats in self.per_source.items():
            out[f"{prefix}accuracy/{source}"] = stats["accuracy"]
        return out

    def to_table(self) -> str:
        rows = [f"{'source':<20} {'n':>6} {'accuracy':>9} {'format':>7} {'think':>7}"]
        for source, s in sorted(self.per_source.items()):
            rows.append(f"{source:<20} {int(s['n']):>6} {s['accuracy']:>9.3f} {s['format']:>7.3f} {s['think_length']:>7.1f}")
        rows.append(f"{'all':<20} {self.num_examples:>6} {self.accuracy:>9.3f} {self.format_rate:>7.3f} {self.think_length:>7.1f}")
        rows.append(f"{'macro average':<20} {'':>6} {self.macro_accuracy:>9.3f}")
        if self.protocol == "paper":
            from care_megatron.stats import mean_interval

            def cell(values):
                stat = mean_interval(values)
                return f"{stat['mean']:.3f}" + (f" ± {stat['half_width']:.3f}" if stat["half_width"] is not None else "")

            rows.append(f"protocol paper: means over {len(self.per_seed_accuracy)} seeded decodes per question; "
                        f"accuracy {cell(self.per_seed_accuracy)}, macro {cell(self.per_seed_macro_accuracy)} "
                        "(± half-width of the 95% t-interval over seeds)")
        return "\n".join(rows)


def evaluate(engine: RolloutEngine, records: list, tokenizer, image_processor, reward_fn, sampling: SamplingParams,
             batch_size: int = 64, progress: bool = False, keep_samples: int = 8,
             image_pipeline=None, system_prompt: str | None = SYSTEM_PROMPT) -> EvalReport:
    """Decode once per record with ``engine`` and score the answer span with ``reward_fn``.

    Never used with RGR (spec section 5: reflection is training-only). The think region is read with
    ``reward_fn``'s tags (:func:`~care_megatron.rewards.registry.reward_tags`), the ones its format check uses.
    """
    tags = reward_tags(reward_fn)
    stop_ids = set(sampling.stop_token_ids)
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])  # n, accuracy, format, think tokens
    samples: list[dict] = []
    bar = tqdm(total=len(records), desc="eval", disable=not progress, leave=False)
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        prompts = [build_prompt(r.question, r.images, tokenizer, image_processor, system_prompt=system_prompt,
                                image_pipeline=image_pipeline)
                   for r in chunk]
        requests = [GenerationRequest(request_id=f"eval-{start + i}", prompt_ids=p.prompt_ids, prompt_text=p.prompt_text,
                                      images=p.images, pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw)
                    for i, p in enumerate(prompts)]
        completions = engine.generate(requests, sampling)
        for record, prompt, completion in zip(chunk, prompts, completions):
            # The response text as the trainer reads it (stop token dropped, byte-exact decode).
            regions, parsed = regions_from_token_ids(strip_stop_token(list(completion.token_ids), stop_ids), tokenizer,
                                                     tags)
            text = parsed.text
            score = reward_fn(text, record.answer, answer_type=record.answer_type, choices=record.choices)
            t = totals[record.source]
            t[0] += 1
            t[1] += float(score.accuracy)
            t[2] += float(score.format)
            t[3] += int((regions == int(Region.THINK)).sum())
            if len(samples) < keep_samples:
                samples.append({"id": record.id, "question": record.question, "answer": record.answer,
                                "response": text, "accuracy": float(score.accuracy), "reason": score.reason or ""})
        bar.update(len(chunk))
    bar.close()
    n = sum(t[0] for t in totals.values())
    per_source = {s: {"n": t[0], "accuracy": t[1] / t[0], "format": t[2] / t[0], "think_length": t[3] / t[0]}
                  for s, t in totals.items()}
    acc = sum(t[1] for t in totals.values()) / max(n, 1)
    fmt = sum(t[2] for t in totals.values()) / max(n, 1)
    think = sum(t[3] for t in totals.values()) / max(n, 1)
    macro = sum(s["accuracy"] for s in per_source.values()) / max(len(per_source), 1)
    return EvalReport(accuracy=acc, format_rate=fmt, macro_accuracy=macro, per_source=per_source,
                      num_examples=int(n), think_length=think, samples=samples)


def combine_seed_reports(reports: list[EvalReport]) -> EvalReport:
    """One report of the paper protocol from one :func:`evaluate` report per seed index (same records, in the
    same order): every number the mean over the seeds, the per-seed accuracies kept, samples of the first seed."""
    if not reports:
        raise ValueError("combine_seed_reports: no report")

    def mean(values):
        values = list(values)
        return sum(values) / len(values)

    per_source = {source: {key: mean(r.per_source[source][key] for r in reports) for key in stats}
                  for source, stats in reports[0].per_source.items()}
    return EvalReport(accuracy=mean(r.accuracy for r in reports), format_rate=mean(r.format_rate for r in reports),
                      macro_accuracy=mean(r.macro_accuracy for r in reports), per_source=per_source,
                      num_examples=reports[0].num_examples, think_length=mean(r.think_length for r in reports),
                      samples=reports[0].samples, protocol="paper",
                      per_seed_accuracy=[r.accuracy for r in reports],
                      per_seed_macro_accuracy=[r.macro_accuracy for r in reports])
