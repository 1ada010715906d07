"""RL step throughput, phase by phase: where one step of any config spends its time.

Runs ``--warmup`` + ``--steps`` RL steps of a config (the trainer's own ``RLTrainer.step``, nothing
re-implemented) and reports, for every phase of ``care_megatron.trainer.RL_PHASES`` and for the
groups the issue names (rollout, RGR round trip, log-prob passes, reference pass, train, weight sync,
sleep / wake, and ``other``: the step's time outside any phase - verifier, advantages, packing):

* seconds per step (mean over the measured steps) and share of the step;
* tokens / s of the phases that process tokens (generated tokens for rollouts, packed tokens for
  the forward passes and the update), per GPU when there are GPUs (each process counts its own
  tokens; under ``torchrun`` rank 0 reports, one rank per GPU);
* MFU of the train phase: ``6 * N * tokens / seconds / peak`` with N the policy's parameter count
  (forward + backward of a dense decoder; attention's quadratic term is left out, as is usual), and
  ``peak`` the accelerator's dense bf16 peak (``--peak-tflops``; a table of known GPUs otherwise;
  none on CPU unless given);
* peak memory per phase: ``torch.cuda.max_memory_allocated`` on GPU, the process's resident-set high
  water mark (``VmHWM``, reset before each phase through ``/proc/self/clear_refs``) on CPU.

The weights are random when ``--shape`` names a model shape (``tiny`` = the registry's tiny model;
``qwen2_5_vl_3b``, ``qwen2_5_vl_7b``, ``qwen3_vl_8b`` = the released models' layer sizes with the
config's tokenizer vocabulary), and ``train.init_from`` is cleared, so no checkpoint is needed. The
prompts are the config's own (synthetic tasks need no download).

``--compare`` runs the same steps with a second configuration and prints both side by side: a YAML
path and/or dotted overrides applied on top of the base, e.g. ``--compare algorithm.name=grpo``,
``--compare rollout.engine=sglang``, ``--compare examples/configs/tiny_cpu_megatron.yaml``; a
``kernels=NAME`` token also forces that variant's kernel backend (see below).
``--compare-decode-path reference`` is the same for the HF engine's reference decoding path (the one
before the speed-up), to measure before / after in one invocation; ``--compare-kernel-backend reference``
likewise for the fused ops' kernel backend (``reference``: the textbook torch chunk arithmetic of the
LM-head log-probs, before the in-place ``torch`` backend; the train, log-prob and reference passes all
use it). Both print whether the last step's metrics are identical. The variants' steps are
interleaved (step k of each before step k + 1 of any), so load from other processes on a shared
machine falls on both alike.

Usage::

    python tools/bench_throughput.py --config examples/configs/tiny_cpu.yaml --steps 3 --json runs/bench.json
    python tools/bench_throughput.py --config examples/configs/tiny_cpu.yaml --compare algorithm.name=grpo
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from care_megatron.kernels._dispatch import BACKENDS as KERNEL_BACKENDS  # noqa: E402
from care_megatron.trainer import RL_PHASES  # noqa: E402

PHASE_GROUPS = {
    "rollout": ("generate",),
    "rgr_round_trip": ("sleep_trainer_rgr", "wake_rollout_rgr", "update_weights_rgr", "wake_rollout_kv_rgr",
                       "generate_rgr", "sleep_rollout_rgr", "wake_trainer_rgr", "logprobs_rgr"),
    "logprob_passes": ("logprobs",),
    "reference_pass": ("reference_logprobs",),
    "train": ("train",),
    "weight_sync": ("update_weights",),
    "sleep_wake": ("wake_rollout", "wake_rollout_kv", "sleep_rollout", "wake_trainer", "sleep_trainer"),
}
"""The issue's phase groups -> ``RL_PHASES`` members; every phase belongs to exactly one group."""
assert sorted(p for g in PHASE_GROUPS.values() for p in g) == sorted(RL_PHASES)

TOKEN_KIND = {"generate": "generated", "generate_rgr": "generated", "logprobs": "policy_pass",
              "logprobs_rgr": "policy_pass", "reference_logprobs": "reference_pass", "train": "train"}
"""Which token count a phase's tokens / s is computed from (see ``TokenCounter``)."""

SHAPES = {
    # text decoder and vision tower sizes of the released checkpoints' config.json
    "qwen2_5_vl_3b": dict(arch="qwen2_5_vl", text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                                         num_attention_heads=16, num_key_value_heads=2),
                          vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                      fullatt_block_indexes=[7, 15, 23, 31]),
                          mrope=[16, 24, 24], tie=True),
    "qwen2_5_vl_7b": dict(arch="qwen2_5_vl", text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                                         num_attention_heads=28, num_key_value_heads=4),
                          vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                      fullatt_block_indexes=[7, 15, 23, 31]),
                          mrope=[16, 24, 24], tie=False),
    "qwen3_vl_8b": dict(arch="qwen3_vl", text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                                     num_attention_heads=32, num_key_value_heads=8, head_dim=128),
                        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                                    num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]),
                        mrope=[24, 20, 20], tie=False),
}
"""Random-weight model shapes for ``--shape`` (plus ``tiny``: the registry's tiny model of the config's arch)."""

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                    "B200": 2250.0, "GH200": 989.0}
"""Dense bf16 peak of known GPUs (vendor data sheets, without sparsity) for MFU when ``--peak-tflops`` is unset."""


def hardware_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"CPU {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def register_shape(shape: str, arch: str) -> str:
    """Registry name of a random-weight model of ``shape`` (registered on first use)."""
    from care_megatron.models import registry

    if shape == "tiny":
        return {"qwen2_5_vl": "tiny_qwen2_5_vl", "qwen3_vl": "tiny_qwen3_vl"}[arch]
    if shape not in SHAPES:
        raise SystemExit(f"--shape: unknown shape {shape!r}; valid: tiny, {', '.join(SHAPES)}")
    spec = SHAPES[shape]
    name = f"bench_{shape}"
    tiny_factory = registry.MODEL_REGISTRY[{"qwen2_5_vl": "tiny_qwen2_5_vl", "qwen3_vl": "tiny_qwen3_vl"}[spec["arch"]]]["config"]

    def factory(vocab_size: int, token_ids: dict[str, int]):
        config = tiny_factory(vocab_size, token_ids)  # token ids, activations, rope type of the family
        text, vision = config.text_config, config.vision_config
        for key, value in spec["text"].items():
            setattr(text, key, value)
        if "head_dim" not in spec["text"]:
            text.head_dim = text.hidden_size // text.num_attention_heads
        text.rope_parameters = dict(text.rope_parameters, mrope_section=list(spec["mrope"]))
        for key, value in spec["vision"].items():
            setattr(vision, key, value)
        vision.out_hidden_size = text.hidden_size
        config.tie_word_embeddings = text.tie_word_embeddings = spec["tie"]
        return config

    registry.MODEL_REGISTRY[name] = {"arch": spec["arch"], "config": factory}
    return name


class TokenCounter:
    """Counts the tokens each kind of phase processes, by wrapping the engine's ``generate`` and the
    backend's ``forward_logprobs`` / ``train_step`` on the trainer instance (the classes are untouched)."""

    def __init__(self, trainer):
        self.counts: dict[str, int] = {}
        engine, backend = trainer.engine, trainer.backend
        generate, forward, train_step = engine.generate, backend.forward_logprobs, backend.train_step

        def counted_generate(requests, sampling):
            completions = generate(requests, sampling)
            self.add("generated", sum(len(c.token_ids) for c in completions))
            self.add("prompt", sum(len(r.prompt_ids) + len(r.prefix_ids) for r in requests))
            return completions

        def counted_forward(micro_batches, *args, **kwargs):
            kind = "reference_pass" if kwargs.get("model") == "reference" else "policy_pass"
            self.add(kind, sum(int(mb.num_tokens) for mb in micro_batches))
            return forward(micro_batches, *args, **kwargs)

        def counted_train(micro_batches, *args, **kwargs):
            self.add("train", sum(int(mb.num_tokens) for mb in micro_batches))
            return train_step(micro_batches, *args, **kwargs)

        engine.generate, backend.forward_logprobs, backend.train_step = counted_generate, counted_forward, counted_train

    def add(self, kind: str, n: int) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + n

    def take(self) -> dict[str, int]:
        out, self.counts = self.counts, {}
        return out


class MemoryProbe:
    """Peak memory (bytes) of each phase: CUDA allocator peak, or the resident-set high water mark."""

    def __init__(self, schedule):
        self.peaks: dict[str, int] = {}
        self.cuda = torch.cuda.is_available()
        self.can_reset_rss = os.access("/proc/self/clear_refs", os.W_OK)
        phase = schedule.phase

        @contextlib.contextmanager
        def probed(name):
            self.reset()
            with phase(name):
                yield
            self.peaks[name] = max(self.peaks.get(name, 0), self.peak())

        schedule.phase = probed

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif self.can_reset_rss:
            with open("/proc/self/clear_refs", "w") as fh:  # "5": reset VmHWM to the current RSS
                fh.write("5")

    def peak(self) -> int:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated())
        with contextlib.suppress(OSError):
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def build_config(config_path: str | None, overrides: list[str], shape: str, steps: int, output_dir: str):
    from care_megatron.config.loader import load_config

    probe = load_config(config_path, overrides)
    model_name = register_shape(shape, probe.model.arch) if shape else probe.model.name
    forced = [f"train.output_dir={output_dir}", f"train.steps={steps}", "train.eval_every=0",
              f"train.save_every={10 ** 9}"]
    if shape:
        arch = SHAPES[shape]["arch"] if shape in SHAPES else probe.model.arch
        forced += [f"model.name={model_name}", f"model.arch={arch}", "train.init_from=null"]
    return load_config(config_path, list(overrides) + forced)


def run_benchmarks(variants: list[dict], shape: str | None, steps: int, warmup: int,
                   peak_tflops: float | None = None) -> dict[str, dict]:
    """Benchmark several configurations, their steps interleaved (step k of every variant before step
    k + 1 of any), so that load from other processes on a shared machine falls on all of them alike.

    ``variants``: ``{"label", "config", "overrides", "decode_path", "kernel_backend"}`` each (the last two
    optional; the kernel backend is forced around that variant's steps). Returns ``{label: report}``
    (see the module docstring).
    """
    from care_megatron.kernels import force_kernel_backend
    from care_megatron.trainer import RLTrainer

    with tempfile.TemporaryDirectory(prefix="bench_throughput_") as out:
        runs = []
        for index, variant in enumerate(variants):
            config = build_config(variant["config"], variant["overrides"], shape, warmup + steps, f"{out}/{index}")
            trainer = RLTrainer(config, progress=False)
            if variant.get("decode_path") is not None:
                trainer.engine.decode_path = variant["decode_path"]
            runs.append({"label": variant["label"], "config": config, "trainer": trainer, "per_step": [],
                         "kernel_backend": variant.get("kernel_backend") or "auto",
                         "counter": TokenCounter(trainer), "memory": MemoryProbe(trainer.schedule), "last": {}})
        for step in range(warmup + steps):
            for run in runs:
                run["memory"].peaks.clear()
                run["counter"].take()
                with force_kernel_backend(run["kernel_backend"]):
                    start = time.perf_counter()
                    metrics = run["trainer"].step(step)
                    wall = time.perf_counter() - start
                if step >= warmup:
                    run["per_step"].append({"wall": wall, "tokens": run["counter"].take(),
                                            "memory": dict(run["memory"].peaks),
                                            "seconds": {p: metrics.get(f"timing/{p}", 0.0) for p in RL_PHASES},
                                            "entered": [p for p in RL_PHASES if f"timing/{p}" in metrics]})
                    run["last"] = metrics
        reports = {}
        for run in runs:
            run["trainer"].engine.shutdown()
            parameters = sum(p.numel() for p in run["trainer"].model.parameters())
            reports[run["label"]] = summarise(run["per_step"], parameters, run["config"], peak_tflops, run["last"])
    return reports


def summarise(per_step: list[dict], parameters: int, config, peak_tflops: float | None, last_metrics: dict) -> dict:
    n = len(per_step)
    # one process drives one GPU (torchrun: one rank per GPU), and the counters see this rank's
    # tokens only, so rates below are per GPU as they stand
    gpus = 1 if torch.cuda.is_available() else 0
    ranks = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    wall = sum(s["wall"] for s in per_step) / n
    tokens = {}
    for s in per_step:
        for kind, count in s["tokens"].items():
            tokens[kind] = tokens.get(kind, 0) + count / n
    if peak_tflops is None and gpus:
        name = torch.cuda.get_device_name(0)
        peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)

    def rate(count: float, seconds: float) -> float | None:
        if not count or seconds <= 0:
            return None
        return count / seconds

    phases = {}
    for phase in RL_PHASES:
        seconds = sum(s["seconds"][phase] for s in per_step) / n
        kind = TOKEN_KIND.get(phase)
        count = tokens.get(kind, 0.0) if kind else 0.0
        if phase.endswith("_rgr") and kind == "generated":
            count = 0.0  # generated tokens are counted per engine call, not per phase; see rollout group
        phases[phase] = {"seconds": seconds, "share": seconds / wall,
                         "entered": sum(phase in s["entered"] for s in per_step),
                         "peak_memory_bytes": max((s["memory"].get(phase, 0) for s in per_step), default=0)}
    groups = {}
    for group, members in PHASE_GROUPS.items():
        seconds = sum(phases[p]["seconds"] for p in members)
        groups[group] = {"seconds": seconds, "share": seconds / wall,
                         "peak_memory_bytes": max(phases[p]["peak_memory_bytes"] for p in members)}
    generate_seconds = phases["generate"]["seconds"] + phases["generate_rgr"]["seconds"]
    groups["rollout"]["tokens_per_s"] = rate(tokens.get("generated", 0.0), generate_seconds)
    groups["logprob_passes"]["tokens_per_s"] = rate(tokens.get("policy_pass", 0.0),
                                                    phases["logprobs"]["seconds"] + phases["logprobs_rgr"]["seconds"])
    groups["reference_pass"]["tokens_per_s"] = rate(tokens.get("reference_pass", 0.0), phases["reference_logprobs"]["seconds"])
    groups["train"]["tokens_per_s"] = rate(tokens.get("train", 0.0), phases["train"]["seconds"])
    train_seconds = phases["train"]["seconds"]
    train_flops = 6.0 * parameters * tokens.get("train", 0.0)
    achieved = train_flops / train_seconds if train_seconds > 0 else None
    groups["train"]["tflops_per_s"] = None if achieved is None else achieved / 1e12
    groups["train"]["mfu"] = None if (achieved is None or not peak_tflops) else achieved / (peak_tflops * 1e12)
    in_phases = sum(p["seconds"] for p in phases.values())
    groups["other"] = {"seconds": max(wall - in_phases, 0.0), "share": max(wall - in_phases, 0.0) / wall,
                       "peak_memory_bytes": 0}
    dominant = max(groups, key=lambda g: groups[g]["seconds"])
    return {
        "model": config.model.name, "algorithm": config.algorithm.name, "engine": config.rollout.engine,
        "backend": config.parallel.backend, "parameters": parameters, "ranks": ranks, "steps": n,
        "peak_tflops": peak_tflops, "step_seconds": wall, "tokens_per_step": tokens, "phases": phases,
        "groups": groups, "dominant_group": dominant,
        "reward_mean": last_metrics.get("reward/mean"),
        # the last step's training metrics (no timings): a speed-up that claims the same results must match them
        "metrics": {k: v for k, v in last_metrics.items() if not k.startswith("timing/") and isinstance(v, (int, float))},
    }


def _fmt(value, spec: str) -> str:
    """``value`` formatted by ``spec``; "-" right-aligned to the spec's width when there is none."""
    if value is None:
        width = spec.split(".")[0]
        return "-".rjust(int(width) if width.isdigit() else 1)
    return format(value, spec)


def format_table(reports: dict[str, dict]) -> str:
    labels = list(reports)
    lines = []
    header = f"{'phase':24s}" + "".join(f"| {label[:34]:>34s} " for label in labels)
    sub = f"{'':24s}" + "".join(f"| {'s/step':>8s} {'share':>6s} {'tok/s':>9s} {'peak MB':>8s} " for _ in labels)
    lines += [header, sub, "-" * len(sub)]
    rows = [(g, True) for g in PHASE_GROUPS] + [("other", True)]
    for group, _ in rows:
        cells = []
        for label in labels:
            g = reports[label]["groups"][group]
            cells.append(f"| {g['seconds']:8.3f} {g['share'] * 100:5.1f}% {_fmt(g.get('tokens_per_s'), '9.0f')} "
                         f"{_fmt(g['peak_memory_bytes'] / 2 ** 20 if g['peak_memory_bytes'] else None, '8.0f')} ")
        lines.append(f"{group:24s}" + "".join(cells))
        for phase in PHASE_GROUPS.get(group, ()):
            if len(PHASE_GROUPS[group]) == 1:
                continue
            cells = []
            for label in labels:
                p = reports[label]["phases"][phase]
                cells.append(f"| {p['seconds']:8.3f} {p['share'] * 100:5.1f}% {'':>9s} "
                             f"{_fmt(p['peak_memory_bytes'] / 2 ** 20 if p['peak_memory_bytes'] else None, '8.0f')} ")
            lines.append(f"  {phase:22s}" + "".join(cells))
    lines.append("-" * len(sub))
    lines.append(f"{'step':24s}" + "".join(f"| {reports[l]['step_seconds']:8.3f} {100.0:5.1f}% {'':>9s} {'':>8s} "
                                             for l in labels))
    lines.append(f"{'train MFU':24s}" + "".join(
        f"| {_fmt(reports[l]['groups']['train']['mfu'] and reports[l]['groups']['train']['mfu'] * 100, '7.2f') + '%':>34s} "
        for l in labels))
    lines.append(f"{'dominant':24s}" + "".join(f"| {reports[l]['dominant_group']:>34s} " for l in labels))
    for label in labels[1:]:
        for group in ("rollout", "train"):
            a, b = reports[labels[0]]["groups"][group]["seconds"], reports[label]["groups"][group]["seconds"]
            if a > 0:
                lines.append(f"{group} time {label} / {labels[0]}: {b / a:.3f}")
        a, b = reports[labels[0]]["step_seconds"], reports[label]["step_seconds"]
        lines.append(f"step time {label} / {labels[0]}: {b / a:.3f}")
    return "\n".join(lines)


def parse_compare(tokens: list[str]) -> tuple[str | None, list[str], str | None]:
    """``--compare`` tokens -> (config path or None, dotted overrides, kernel backend or None).

    ``kernels=NAME`` among the tokens forces the fused-op kernel backend of that variant (so one
    variant can switch a config field and the kernels at once: the whole "before")."""
    path = tokens[0] if tokens and tokens[0].endswith((".yaml", ".yml")) else None
    rest = tokens[1:] if path else tokens
    kernels = [t.split("=", 1)[1] for t in rest if t.startswith("kernels=")]
    if kernels and kernels[-1] not in KERNEL_BACKENDS:
        raise SystemExit(f"--compare kernels={kernels[-1]}: expected one of {', '.join(KERNEL_BACKENDS)}")
    return path, [t for t in rest if not t.startswith("kernels=")], (kernels[-1] if kernels else None)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="YAML config (default: all defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the base config, e.g. algorithm.name=grpo")
    parser.add_argument("--shape", default=None, choices=["tiny", *SHAPES],
                        help="random weights of this model shape (train.init_from cleared); default: the config's model")
    parser.add_argument("--steps", type=int, default=3, help="measured RL steps")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    parser.add_argument("--compare", nargs="+", default=None, metavar="CONFIG_OR_OVERRIDE",
                        help="second configuration: [YAML] [dotted overrides], applied on top of the base's")
    parser.add_argument("--compare-decode-path", default=None, choices=["fast", "reference"],
                        help="second run: same config, HF engine decode path switched (before / after)")
    parser.add_argument("--decode-path", default=None, choices=["fast", "reference"], help="HF engine decode path")
    parser.add_argument("--compare-kernel-backend", default=None, choices=KERNEL_BACKENDS,
                        help="second run: same config, fused-op kernel backend forced (before / after)")
    parser.add_argument("--kernel-backend", default=None, choices=KERNEL_BACKENDS,
                        help="fused-op kernel backend of the base run (default auto: triton on CUDA, else torch)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak for MFU (default: known GPUs)")
    parser.add_argument("--json", default=None, help="write the reports here")
    args = parser.parse_args(argv)

    base_label = " ".join([*([f"decode={args.decode_path}"] if args.decode_path else []),
                           *([f"kernels={args.kernel_backend}"] if args.kernel_backend else [])]) or "base"
    base = {"label": base_label, "config": args.config, "overrides": args.overrides, "decode_path": args.decode_path,
            "kernel_backend": args.kernel_backend}
    variants = [base]
    if args.compare:
        path, extra, kernels = parse_compare(args.compare)
        variants.append({**base, "label": " ".join(args.compare), "config": path or args.config,
                         "overrides": args.overrides + extra, "kernel_backend": kernels or args.kernel_backend})
    if args.compare_decode_path:
        variants.append({**base, "label": f"decode={args.compare_decode_path}", "decode_path": args.compare_decode_path})
    if args.compare_kernel_backend:
        variants.append({**base, "label": f"kernels={args.compare_kernel_backend}",
                         "kernel_backend": args.compare_kernel_backend})
    reports = run_benchmarks(variants, args.shape, args.steps, args.warmup, args.peak_tflops)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return {"reports": reports}
    result = {"hardware": hardware_name(), "torch": torch.__version__, "config": args.config,
              "overrides": args.overrides, "shape": args.shape, "reports": reports}
    print(f"hardware: {result['hardware']}; {args.steps} measured steps after {args.warmup} warm-up")
    print(format_table(reports))
    if args.compare_decode_path or args.compare_kernel_backend:  # a path switch claiming the same results: every metric equal
        first, second = reports[variants[0]["label"]]["metrics"], reports[variants[-1]["label"]]["metrics"]
        differing = sorted(k for k in set(first) | set(second) if first.get(k) != second.get(k)
                           and not (first.get(k) != first.get(k) and second.get(k) != second.get(k)))  # NaN == NaN here
        print(f"last-step metrics of {variants[0]['label']} and {variants[-1]['label']}: "
              + ("identical" if not differing else f"differ in {differing}") + f" ({len(first)} metrics)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
