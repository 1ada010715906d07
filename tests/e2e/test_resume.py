"""``care-train --resume`` end to end: past a damaged newest checkpoint (plain-PyTorch backend), and
with each data-parallel rank's own RNG state (DP=2 on the Megatron backend, gloo, CPU).

Unit-level checks of the fallback (every kind of damage, the error when nothing is usable):
tests/test_resume_fallback.py.
"""
import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_rl_loop import SMALL, _rl_rows, small_config
from test_scripted_step import SCRIPTED

from care_megatron import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]


def test_care_train_resume_passes_over_a_truncated_checkpoint(tmp_path, caplog, monkeypatch):
    """Steps 1-2 with a checkpoint after each; step 2's backend file is cut short. ``care-train
    --resume`` warns naming both checkpoints, restarts from step 1 and redoes step 2 exactly."""
    from care_megatron import runtime
    from care_megatron.cli import main
    from care_megatron.trainer import train

    overrides = ["train.steps=2", "train.save_every=1", "train.keep_last=2"]
    train(small_config(tmp_path, *overrides), progress=False)
    first = _rl_rows(tmp_path / "metrics.jsonl")
    backend_file = tmp_path / "checkpoints" / "step_000002" / "backend"
    backend_file.write_bytes(backend_file.read_bytes()[:1000])

    monkeypatch.setattr(runtime, "_preemption", {"installed": False, "signal": 0})  # main() installs handlers
    previous = {sig: signal.getsignal(sig) for sig in runtime.PREEMPTION_SIGNALS}
    try:
        with caplog.at_level(logging.WARNING, logger="care_megatron.checkpoint"):
            assert main("train", ["--config", str(ROOT / "examples/configs/tiny_cpu_shapes.yaml"), *SMALL,
                                  f"train.output_dir={tmp_path}", *overrides, "--resume", "--no-progress"]) == 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    [warning] = [r.getMessage() for r in caplog.records if r.name == "care_megatron.checkpoint"]
    assert "step_000002 (backend has 1000 bytes" in warning
    assert warning.endswith("step_000001, the newest complete checkpoint")
    assert _rl_rows(tmp_path / "metrics.jsonl") == first  # step 2 again, the same numbers
    assert ckpt.checkpoint_problem(tmp_path / "checkpoints" / "step_000002") is None  # written whole again


def _dp2_run(out: Path, *overrides: str) -> str:
    """``care-train`` on 2 gloo ranks, DP=2 (TP=1), the global-RNG engine (global_rng_worker.py) on
    the scripted step's data; returns stdout + stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(Path(__file__).with_name("global_rng_worker.py")), "train",
           "--config", str(ROOT / "examples/configs/tiny_cpu_megatron.yaml"), *SCRIPTED,
           "parallel.tensor_model_parallel_size=1", "train.save_every=1", "train.keep_last=3",
           f"train.output_dir={out}", *overrides, "--no-progress"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout + done.stderr


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "final" / "model.safetensors")


@pytest.mark.slow
@pytest.mark.distributed
def test_dp2_resume_restores_each_ranks_rng_state(tmp_path):
    """3 steps straight vs 1 step + ``--resume`` + 2 steps, DP=2: the same per-step metrics (both
    ranks' rollouts are in them) and the same final weights. The ranks' global RNG states differ after
    step 1, and a resume that gives rank 1 rank 0's state (what saving rank 0's alone did) changes
    the run: the check that this test can fail."""
    pytest.importorskip("megatron.core")
    full, part = tmp_path / "full", tmp_path / "part"
    _dp2_run(full, "train.steps=3")
    _dp2_run(part, "train.steps=1")
    step1 = part / "checkpoints" / "step_000001"
    states = [torch.load(step1 / ckpt.rng_file(rank), weights_only=False)["torch"] for rank in (0, 1)]
    assert not torch.equal(*states)  # the ranks' global streams have parted

    rank0_everywhere = tmp_path / "rank0_everywhere"
    shutil.copytree(part, rank0_everywhere)
    shutil.copy(step1 / ckpt.rng_file(0), rank0_everywhere / "checkpoints" / "step_000001" / ckpt.rng_file(1))
    ckpt._write_marker(rank0_everywhere / "checkpoints" / "step_000001", 1, 2)

    assert "resumed from" in _dp2_run(part, "train.steps=3", "--resume")
    expected = _rl_rows(full / "metrics.jsonl")
    assert [r["step"] for r in expected] == [1, 2, 3]
    assert _rl_rows(part / "metrics.jsonl") == expected
    weights, resumed = _final_weights(full), _final_weights(part)
    assert weights.keys() == resumed.keys() and all(torch.equal(weights[k], resumed[k]) for k in weights)

    _dp2_run(rank0_everywhere, "train.steps=3", "--resume")
    assert _rl_rows(rank0_everywhere / "metrics.jsonl") != expected


def test_care_sft_preempted_then_resumed_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    """care-sft, 6 steps straight vs preempted before step 4 (a checkpoint at step 3, then exit 128 + signal)
    and ``care-sft --resume``: the same per-step metrics and bit-identical final weights. A periodic
    checkpoint (``train.sft_save_every``) is written and pruned to ``train.keep_last``."""
    from safetensors.torch import load_file

    from care_megatron import runtime
    from care_megatron.cli import main
    from care_megatron.metrics import read_metrics
    from care_megatron.sft import run_sft

    full, part = tmp_path / "full", tmp_path / "part"
    run_sft(small_config(full, "train.sft_save_every=2", "train.keep_last=2"), progress=False)
    assert sorted(p.name for p in (full / "sft_checkpoints").iterdir()) == ["step_000002", "step_000004"]

    calls = {"n": 0}

    def preempt_before_step_4():
        calls["n"] += 1
        if calls["n"] == 4:
            raise runtime.PreemptionRequested(signal.SIGUSR1)

    args = ["--config", str(ROOT / "examples/configs/tiny_cpu_shapes.yaml"), *SMALL, f"train.output_dir={part}",
            "--no-progress"]
    monkeypatch.setattr(runtime, "_preemption", {"installed": False, "signal": 0})  # main() installs handlers
    previous = {sig: signal.getsignal(sig) for sig in runtime.PREEMPTION_SIGNALS}
    try:
        with monkeypatch.context() as patch:
            patch.setattr(runtime, "check_preemption", preempt_before_step_4)
            assert main("sft", args) == 128 + signal.SIGUSR1
        assert sorted(p.name for p in (part / "sft_checkpoints").iterdir()) == ["step_000003"]
        assert not (part / "sft" / "model.safetensors").exists()
        assert main("sft", [*args, "--resume"]) == 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    expected = read_metrics(full / "sft" / "metrics.jsonl")
    got = read_metrics(part / "sft" / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    drop = ("time",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in got] == \
        [{k: v for k, v in r.items() if k not in drop} for r in expected]
    a, b = load_file(full / "sft" / "model.safetensors"), load_file(part / "sft" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
