"""``care-eval``: single greedy decode per held-out / benchmark question, exact match on the answer span.

The questions are ``data.tasks``' held-out split (synthetic tasks, easy-VQA's test split, or a
``jsonl:`` benchmark file in the unified schema, e.g. MathVista-mini converted with
``tools/prepare_data.py``). The policy is ``--checkpoint`` (a Hugging Face directory such as
``runs/tiny_cpu/final`` or ``runs/tiny_cpu/sft``, or an RL checkpoint ``step_*`` directory), else
``train.init_from`` / ``model.name``.

With ``eval.benchmarks`` (or ``care-eval --benchmarks mathvista=PATH,...``) the questions are instead
the paper's benchmarks read from their own releases, independent of the training data (no dedup, no
sampling from the mixture): :func:`run_benchmark_evaluation`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import torch

from care_megatron.config.schema import ConfigError, RunConfig
from care_megatron.evaluation.scoring import EvalReport, evaluate


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


def run_evaluation(config: RunConfig, checkpoint: str | None = None, greedy: bool = True,
                   progress: bool = True) -> EvalReport:
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
    sampling = SamplingParams(temperature=0.0 if greedy else config.rollout.temperature,
                              top_p=1.0 if greedy else config.rollout.top_p,
                              max_new_tokens=config.rollout.max_new_tokens, stop_token_ids=engine.stop_token_ids,
                              seed=config.train.seed)
    reward_fn = functools.partial(get_reward_fn("verifier"),
                                  config=VerifierConfig(format_weight=config.algorithm.format_weight,
                                                        tags=config.data.tag_config))
    from care_megatron.data.images import run_image_pipeline
    from care_megatron.data.prompting import resolve_system_prompt

    # the same prompts the policy was trained and evaluated on during training (data.system_prompt)
    report = evaluate(engine, records, tokenizer, image_processor, reward_fn, sampling,
                      batch_size=config.rollout.batch_size, progress=progress, keep_samples=16,
                      image_pipeline=run_image_pipeline(config.data, image_processor),
                      system_prompt=resolve_system_prompt(config.data.system_prompt, config.data.tag_config))
    out = Path(config.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_report.json").write_text(json.dumps(dataclasses.asdict(report), indent=1, default=float))
    return report


def run_benchmark_evaluation(config: RunConfig, checkpoint: str | None = None, benchmarks: dict[str, str] | None = None,
                             progress: bool = True):
    """One greedy decode per example of ``benchmarks`` (default ``eval.benchmarks``) through ``rollout.engine``.

    Writes ``<eval.output_dir>/{<benchmark>.jsonl, decoding.json, summary.json, table.md, benchmarks.png}``
    and returns the :class:`~care_megatron.evaluation.benchmark_eval.BenchmarkReport`.
    """
    from care_megatron.evaluation.benchmark_eval import evaluate_benchmarks, load_judge
    from care_megatron.rollout.base import SamplingParams
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
    sampling = SamplingParams(temperature=0.0, top_p=1.0,
                              max_new_tokens=config.eval.max_new_tokens or config.rollout.max_new_tokens,
                              stop_token_ids=list(engine.stop_token_ids), seed=config.train.seed)
    output_dir = config.eval.output_dir or str(Path(config.train.output_dir) / "eval")
    return evaluate_benchmarks(engine, tokenizer, image_processor, benchmarks, output_dir, sampling,
                               batch_size=config.rollout.batch_size, limit=config.eval.limit, judge=judge,
                               judge_name=judge_name, model_name=str(checkpoint or model_config.name),
                               progress=progress, label=config.eval.label,
                               published_base_model=config.eval.published_base, tags=config.data.tag_config)
