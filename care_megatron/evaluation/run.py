"""``care-eval``: decode each held-out / benchmark question (``eval.protocol``), exact match on the answer span.

The questions are ``data.tasks``' held-out split (synthetic tasks, easy-VQA's test split, or a
``jsonl:`` benchmark file in the unified schema, e.g. MathVista-mini converted with
``tools/prepare_data.py``). The policy is ``--checkpoint`` (a Hugging Face directory such as
``runs/tiny_cpu/final`` or ``runs/tiny_cpu/sft``, or an RL checkpoint ``step_*`` directory), else
``train.init_from`` / ``model.name``.

With ``eval.benchmarks`` (or ``care-eval --benchmarks mathvista=PATH,...``) the questions are instead
the paper's benchmarks read from their own releases, independent of the training data (no dedup, no
sampling from the mixture): :func:`run_benchmark_evaluation`.

``eval.protocol`` (``care-eval --protocol``) picks the decoding of both: ``greedy`` (default) one greedy
decode per question; ``paper`` ``eval.seeds`` decodes per question at the rollout's temperature / top-p /
top-k, seed index ``k`` drawn with the sampling seed
:func:`~care_megatron.evaluation.benchmark_eval.decode_seed` ``(train.seed, k)``. The held-out report
(:func:`run_evaluation`) then averages accuracy, format rate, think length and the per-source numbers
over the seeds and carries the per-seed accuracies with their t-interval; the benchmark report
(:func:`run_benchmark_evaluation`) is described in :mod:`~care_megatron.evaluation.benchmark_eval`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import torch

from care_megatron.config.schema import ConfigError, RunConfig
from care_megatron.evaluation.scoring import EvalReport, combine_seed_reports, evaluate


def _model_config(config: RunConfig, checkpoint: str | None):
    if checkpoint and (Path(checkpoint) / "config.json").exists():
        return dataclasses.replace(config.model, name=str(checkpoint), tokenizer=str(checkpoint)), None
    if checkpoint and (Path(checkpoint) / "backend").is_file():
        return _base_model_config(config), Path(checkpoint) / "backend"
    if checkpoint:
        raise FileNotFoundError(f"--checkpoint {checkpoint}: neither a Hugging Face directory (config.json) "
                                "nor a plain-PyTorch RL checkpoint (step_*/backend)")
    return _base_model_config(config), None


def _load_policy(config: RunConfig, checkpoint: str | None):
    """The policy to evaluate: model, tokenizer, image processor, its model config, and the
    trainer-state file its weights came from (None for a Hugging Face directory)."""
    from care_megatron.models import build_model_and_processor

    model_config, state_path = _model_config(config, checkpoint)
    model, tokenizer, image_processor = build_model_and_processor(
        model_config, device="cuda" if torch.cuda.is_available() else "cpu",
        min_pixels=config.data.min_pixels, max_pixels=config.data.max_pixels)
    if state_path is not None:
        model.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=False)["model"])
    return model, tokenizer, image_processor, model_config, state_path


def _base_model_config(config: RunConfig):
    from care_megatron.models.policy import policy_model_config

    return policy_model_config(config)


def _protocol_sampling(config: RunConfig, stop_token_ids, max_new_tokens: int, paper: bool):
    """SamplingParams of a decode under ``eval.protocol``: greedy, or the rollout's sampling settings
    (the seed is ``train.seed``; the paper protocol derives each seed index's own from it)."""
    from care_megatron.rollout.base import SamplingParams

    return SamplingParams(temperature=config.rollout.temperature if paper else 0.0,
                          top_p=config.rollout.top_p if paper else 1.0, top_k=config.rollout.top_k if paper else -1,
                          max_new_tokens=max_new_tokens, stop_token_ids=list(stop_token_ids), seed=config.train.seed)


def run_evaluation(config: RunConfig, checkpoint: str | None = None, greedy: bool = True,
                   progress: bool = True) -> EvalReport:
    """The held-out split of ``data.tasks`` (or ``data.eval_tasks``), written to
    ``<train.output_dir>/eval_report.json``.

    ``eval.protocol: greedy``: one decode per question, greedy unless ``greedy`` is False (``care-eval
    --no-greedy``: one decode at the rollout's temperature / top-p, seed ``train.seed``).
    ``eval.protocol: paper``: ``eval.seeds`` decodes per question at the rollout's sampling settings (``greedy``
    is then not used), seed index ``k`` with seed ``decode_seed(train.seed, k)``; the report's numbers are
    means over the seeds, ``per_seed_accuracy`` / ``per_seed_macro_accuracy`` the per-seed values.
    """
    from care_megatron.data.dataset import build_records
    from care_megatron.rewards.registry import get_reward_fn
    from care_megatron.rewards.verifier import VerifierConfig
    from care_megatron.rollout.base import SamplingParams
    from care_megatron.rollout.registry import get_rollout_engine

    model, tokenizer, image_processor, _, _ = _load_policy(config, checkpoint)
    engine = get_rollout_engine("hf", model.eval(), tokenizer, batch_size=config.rollout.batch_size)
    records = build_records(config.data).eval
    if not records:
        raise ConfigError("data.eval_size", "the held-out set is empty")
    paper = config.eval.protocol == "paper"
    sampling = SamplingParams(temperature=0.0 if greedy else config.rollout.temperature,
                              top_p=1.0 if greedy else config.rollout.top_p,
                              max_new_tokens=config.rollout.max_new_tokens, stop_token_ids=engine.stop_token_ids,
                              seed=config.train.seed)
    if paper:
        sampling = _protocol_sampling(config, engine.stop_token_ids, config.rollout.max_new_tokens, paper=True)
    reward_fn = functools.partial(get_reward_fn("verifier"),
                                  config=VerifierConfig(format_weight=config.algorithm.format_weight,
                                                        tags=config.data.tag_config))
    from care_megatron.data.images import run_image_pipeline
    from care_megatron.data.prompting import resolve_system_prompt

    # the same prompts the policy was trained and evaluated on during training (data.system_prompt)
    image_pipeline = run_image_pipeline(config.data, image_processor)
    system_prompt = resolve_system_prompt(config.data.system_prompt, config.data.tag_config)

    def once(seeded: SamplingParams) -> EvalReport:
        return evaluate(engine, records, tokenizer, image_processor, reward_fn, seeded,
                        batch_size=config.rollout.batch_size, progress=progress, keep_samples=16,
                        image_pipeline=image_pipeline, system_prompt=system_prompt)

    if paper:
        from care_megatron.evaluation.benchmark_eval import decode_seed

        report = combine_seed_reports([once(dataclasses.replace(sampling, seed=decode_seed(config.train.seed, k)))
                                       for k in range(config.eval.seeds)])
    else:
        report = once(sampling)
    out = Path(config.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_report.json").write_text(json.dumps(dataclasses.asdict(report), indent=1, default=float))
    return report


def run_benchmark_evaluation(config: RunConfig, checkpoint: str | None = None, benchmarks: dict[str, str] | None = None,
                             progress: bool = True):
    """Decode every example of ``benchmarks`` (default ``eval.benchmarks``) through ``rollout.engine`` under
    ``eval.protocol``: one greedy decode, or (``paper``) ``eval.seeds`` decodes at the rollout's sampling settings.

    Writes ``<eval.output_dir>/{<benchmark>.jsonl, decoding.json, summary.json, table.md, benchmarks.png}``
    and returns the :class:`~care_megatron.evaluation.benchmark_eval.BenchmarkReport`.
    """
    from care_megatron.evaluation.benchmark_eval import evaluate_benchmarks, load_judge
    from care_megatron.rollout.builder import build_rollout_engine
    from care_megatron.rollout.registry import get_rollout_engine

    benchmarks = dict(benchmarks if benchmarks is not None else config.eval.benchmarks)
    if not benchmarks:
        raise ConfigError("eval.benchmarks", "no benchmark given (NAME=PATH, e.g. mathvista=/data/MathVista)")
    judge, judge_name = load_judge(config.eval.judge) if config.eval.judge else (None, None)
    model, tokenizer, image_processor, model_config, state_path = _load_policy(config, checkpoint)
    if config.rollout.engine == "hf":
        engine = get_rollout_engine("hf", model.eval(), tokenizer, batch_size=config.rollout.batch_size)
    else:
        if state_path is not None:
            raise ValueError(f"rollout.engine={config.rollout.engine} starts from a Hugging Face directory; "
                             f"--checkpoint {checkpoint} is a plain-PyTorch RL checkpoint (export it, or use the final/ directory)")
        engine_config = dataclasses.replace(config, model=model_config,
                                            train=dataclasses.replace(config.train, init_from=None))
        engine = build_rollout_engine(engine_config, model, tokenizer)
    sampling = _protocol_sampling(config, engine.stop_token_ids,
                                  config.eval.max_new_tokens or config.rollout.max_new_tokens,
                                  paper=config.eval.protocol == "paper")
    output_dir = config.eval.output_dir or str(Path(config.train.output_dir) / "eval")
    return evaluate_benchmarks(engine, tokenizer, image_processor, benchmarks, output_dir, sampling,
                               batch_size=config.rollout.batch_size, limit=config.eval.limit, judge=judge,
                               judge_name=judge_name, model_name=str(checkpoint or model_config.name),
                               progress=progress, label=config.eval.label,
                               published_base_model=config.eval.published_base,
                               protocol=config.eval.protocol, seeds=config.eval.seeds,
                               tags=config.data.tag_config)
