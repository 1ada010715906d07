"""Command line: ``care-train``, ``care-sft``, ``care-eval`` (also ``python -m care_megatron.cli <command>``).

Every command takes ``--config FILE`` and any number of ``section.field=value`` overrides, e.g.
``care-train --config examples/configs/tiny_cpu.yaml algorithm.name=grpo train.steps=50``.

A bad value ends the run with one line on stderr naming the field and the fix, and exit status 2,
whether it is found while the config loads or later (an unknown task, a missing ``train.init_from``
or data file, no usable checkpoint for ``--resume``: :class:`ConfigError`). ``--debug`` or
``CARE_DEBUG=1`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from care_megatron.config import ConfigError, load_config

DEBUG_ENV = "CARE_DEBUG"
"""Environment variable that, set to anything but empty or 0, keeps the traceback of a bad value
(as ``--debug`` does): for launchers that pass the same arguments to every command."""

COMMANDS = {
    "train": "RL training (CARE or a baseline) through care_megatron.trainer",
    "sft": "cold-start supervised fine-tuning on reference rationales",
    "eval": "held-out / benchmark evaluation of a policy (eval.protocol: one greedy decode, or the paper's "
            "seeded sampled decodes; exact match on the answer span)",
}


def _parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"care-{command}", description=COMMANDS[command],
        epilog="Overrides: section.field=value (sections: model, parallel, rollout, algorithm, data, train). "
               "Invalid values fail at start with a message naming the field.")
    p.add_argument("--config", help="YAML run config (default: built-in defaults = the tiny CPU run)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50 algorithm.name=grpo")
    p.add_argument("--no-progress", action="store_true", help="disable the progress bar (logs still go to metrics.jsonl)")
    p.add_argument("--log-level", default="INFO", help="python logging level (default INFO)")
    p.add_argument("--debug", action="store_true",
                   help=f"on a bad value show the traceback, not one line (also {DEBUG_ENV}=1)")
    if command == "train":
        p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.output_dir")
    if command == "sft":
        p.add_argument("--resume", action="store_true",
                       help="continue from the newest SFT checkpoint in <train.output_dir>/sft_checkpoints")
    if command == "eval":
        p.add_argument("--checkpoint", help="policy directory (HF format) or RL checkpoint step_* directory to evaluate")
        p.add_argument("--greedy", action=argparse.BooleanOptionalAction, default=True, help="greedy decoding (default)")
        p.add_argument("--benchmarks", help="NAME=PATH[,NAME=PATH...] of the paper's benchmarks (mathvista, mathverse, "
                                            "mathvision, mmmu, mmmu_pro_standard, mmmu_pro_vision); overrides eval.benchmarks")
        p.add_argument("--protocol", help="greedy (one greedy decode per example) or paper (eval.seeds decodes at the "
                                          "rollout's sampling settings, mean over seeds with a t-interval); "
                                          "overrides eval.protocol")
        p.add_argument("--seeds", help="decodes per example under the paper protocol; overrides eval.seeds")
    return p


def main(command: str, argv: list[str] | None = None) -> int:
    args = _parser(command).parse_intermixed_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        config = load_config(args.config, args.overrides)
    except (ValueError, OSError) as exc:
        if debug:
            raise
        return _invalid_configuration(command, exc)
    try:
        return _run(command, args, config)
    except ConfigError as exc:  # a bad value found after start-up; anything else keeps its traceback
        if debug:
            raise
        return _invalid_configuration(command, exc)


def _invalid_configuration(command: str, exc: Exception) -> int:
    """One line on stderr (a message's own line breaks folded) and the usage-error exit status."""
    print(f"care-{command}: invalid configuration: {' '.join(str(exc).split())}", file=sys.stderr)
    return 2


def _run(command: str, args: argparse.Namespace, config) -> int:
    progress = not args.no_progress
    if command in ("train", "sft"):
        from care_megatron.runtime import PreemptionRequested, install_preemption_handlers

        install_preemption_handlers()
        if command == "train":
            from care_megatron.trainer import train as run

            print_memory_plan(config)
            checkpoints = f"{config.train.output_dir}/checkpoints"
        else:
            from care_megatron.sft import run_sft as run, sft_checkpoint_dir

            checkpoints = sft_checkpoint_dir(config)
        try:
            run(config, resume=args.resume, progress=progress)
        except PreemptionRequested as exc:
            print(f"care-{command}: {exc}; checkpoint written under {checkpoints}, continue with --resume",
                  file=sys.stderr)
            return 128 + exc.signum  # the shell's convention for "ended by this signal"
    else:
        from care_megatron.evaluation.run import run_benchmark_evaluation, run_evaluation

        config = _eval_flags(args, config)
        if args.benchmarks or config.eval.benchmarks:
            from care_megatron.evaluation.benchmark_eval import parse_benchmark_paths

            try:
                benchmarks = parse_benchmark_paths(args.benchmarks) if args.benchmarks else None
            except ValueError as exc:
                print(f"care-eval: {exc}", file=sys.stderr)
                return 2
            report = run_benchmark_evaluation(config, checkpoint=args.checkpoint, benchmarks=benchmarks,
                                              progress=progress)
            print(report.to_markdown(config.eval.label, base_model=config.eval.published_base))
            return 0
        report = run_evaluation(config, checkpoint=args.checkpoint, greedy=args.greedy, progress=progress)
        print(report.to_table())
    return 0


def _eval_flags(args: argparse.Namespace, config):
    """``--protocol`` / ``--seeds`` written into ``config.eval`` (validated there: a bad value is a
    ConfigError naming ``eval.protocol`` / ``eval.seeds``)."""
    import dataclasses

    changes = {}
    if args.protocol is not None:
        changes["protocol"] = args.protocol
    if args.seeds is not None:
        try:
            changes["seeds"] = int(args.seeds)
        except ValueError:
            raise ConfigError("eval.seeds", f"--seeds {args.seeds!r} is not an integer") from None
    return dataclasses.replace(config, eval=dataclasses.replace(config.eval, **changes)) if changes else config


def print_memory_plan(config) -> None:
    """On GPU, rank 0 prints the per-GPU memory plan of the run (care_megatron.memory_plan) before
    anything is allocated, so a layout that cannot fit is visible in the first lines of the log."""
    import torch

    if not torch.cuda.is_available() or os.environ.get("RANK", "0") != "0":
        return
    from care_megatron.memory_plan import GIB, plan_memory

    try:
        gpus = int(os.environ.get("WORLD_SIZE", "1"))
        memory = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory / GIB
        print(plan_memory(config, gpu_memory_gib=memory, gpus=gpus).report(), file=sys.stderr)
    except (ValueError, OSError, KeyError) as exc:  # an estimate must never stop a run
        logging.getLogger(__name__).warning("no memory plan: %s", exc)


def train_main() -> None:
    sys.exit(main("train"))


def sft_main() -> None:
    sys.exit(main("sft"))


def eval_main() -> None:
    sys.exit(main("eval"))


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print("usage: python -m care_megatron.cli {train,sft,eval} [--config FILE] [overrides...]", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2:]))
