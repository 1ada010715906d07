"""The RL loop on the Megatron-Core backend (TP=2, CP=2 or PP=2; gloo, CPU) reproduces the plain-PyTorch backend's
metrics from the same seed and weights (issue 6 end to end)."""
import subprocess
import sys
from pathlib import Path

import pytest

from test_rl_loop import SMALL, _rl_rows, small_config

ROOT = Path(__file__).resolve().parents[2]
def _torchrun(command: str, *overrides: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 -m care_megatron.cli <command>`` on tiny_cpu_megatron.yaml + SMALL."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "care_megatron.cli", command,
           "--config", str(ROOT / "examples/configs/tiny_cpu_megatron.yaml"), *SMALL, *overrides, "--no-progress"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


KEYS = ["loss", "pg_loss", "kl", "entropy", "grad_norm", "reward/mean", "accuracy/mean", "signal/failure_share",
        "length/response_mean", "rollout/mismatch_abs_mean"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout,expected", [
    (["parallel.tensor_model_parallel_size=2"], "TP=2 PP=1 CP=1"),
    pytest.param(["parallel.tensor_model_parallel_size=1", "parallel.context_parallel_size=2"], "TP=1 PP=1 CP=2",
                 marks=pytest.mark.extended),  # CP=2 parity: tests/training/megatron (test_context_parallel_cp2_parity_qwen2_5_vl)
    (["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=2"], "TP=1 PP=2 CP=1"),
], ids=["tp2", "cp2", "pp2"])
def test_megatron_matches_torch_backend(tmp_path, layout, expected):
    pytest.importorskip("megatron.core")
    from care_megatron.trainer import train

    steps = ["train.steps=3", "train.save_every=3"]
    train(small_config(tmp_path / "torch", *steps), progress=False)
    done = _torchrun("train", *steps, *layout, f"train.output_dir={tmp_path / 'megatron'}")
    assert expected in done.stdout + done.stderr  # the backend's start-up line names the layout it runs
    a, b = _rl_rows(tmp_path / "torch" / "metrics.jsonl"), _rl_rows(tmp_path / "megatron" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for k in KEYS:
            assert rb[k] == pytest.approx(ra[k], rel=2e-3, abs=1e-5), (ra["step"], k)
    # the Megatron run's checkpoint is a distributed checkpoint directory; its final policy an HF directory
    assert (tmp_path / "megatron" / "checkpoints" / "step_000003" / "backend").is_dir()
    assert (tmp_path / "megatron" / "final" / "config.json").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_megatron_data_parallel_dp2_runs_and_resumes(tmp_path):
    """DP=2 (TP=1): each rank rolls out its half of the prompts; the step's diagnostics cover both
    ranks' groups (rl_step_metrics gathers them), and a resumed run continues from the checkpoint."""
    pytest.importorskip("megatron.core")
    base = ["train.save_every=1", "parallel.tensor_model_parallel_size=1", f"train.output_dir={tmp_path}"]
    done = _torchrun("train", *base, "train.steps=1")
    assert "TP=1 PP=1 CP=1 DP=2" in done.stdout + done.stderr
    _torchrun("train", *base, "train.steps=2", "--resume")
    rows = _rl_rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["groups/count"] == 2.0, r  # 2 prompts per step = one group per rank, both in the metrics
        rates = [r[k] for k in ("groups/anchored_rate", "groups/saturated_rate", "rescue/rate")]
        assert sum(rates) == pytest.approx(1.0), r  # every group of both ranks is classified exactly once


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", [["parallel.tensor_model_parallel_size=1"],
                                    pytest.param(["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
                                                 marks=pytest.mark.extended)],
                         ids=["dp2", "tp2_sp"])
def test_megatron_sft_matches_torch_backend(tmp_path, layout):
    """care-sft on 2 ranks (DP=2: each rank its half of the batch, normalised by the whole batch's
    tokens; or TP=2 with sequence parallelism: micro-batches padded to a multiple of TP) gives the
    torch backend's losses, NLL and gradient norms."""
    pytest.importorskip("megatron.core")
    from care_megatron.metrics import read_metrics
    from care_megatron.sft import run_sft

    steps = ["train.sft_steps=3"]
    run_sft(small_config(tmp_path / "torch", *steps), progress=False)
    _torchrun("sft", *steps, *layout, f"train.output_dir={tmp_path / 'megatron'}")
    a = read_metrics(tmp_path / "torch" / "sft" / "metrics.jsonl")
    b = read_metrics(tmp_path / "megatron" / "sft" / "metrics.jsonl")
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        for k in ("loss", "sft/token_nll", "grad_norm"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), (ra["step"], k)


SCRIPTED_KEYS = KEYS + ["adv/abs_mean", "rgr/trigger_rate", "rgr/success_rate", "rgr/reward_mean", "rescue/rate",
                        "groups/anchored_rate", "kprime/mean", "signature/pearson", "clip_frac/all"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout,expected", [
    (["parallel.tensor_model_parallel_size=2"], "TP=2 PP=1 CP=1"),
    pytest.param(["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=2"], "TP=1 PP=2 CP=1",
                 marks=pytest.mark.extended),
], ids=["tp2", "pp2"])
def test_megatron_matches_torch_backend_on_the_anchored_path(tmp_path, monkeypatch, layout, expected):
    """The scripted step (anchored groups with RGR success and failure, rescue, saturated group; see
    test_scripted_step.py) on Megatron equals the torch backend's loss, gradient norm and metrics."""
    pytest.importorskip("megatron.core")
    import scripted_engine
    from test_scripted_step import SCRIPTED, scripted_config

    from care_megatron.trainer import train

    steps = ["train.steps=2", "train.save_every=2"]
    with monkeypatch.context() as patch:
        import care_megatron.rollout.builder as builder

        patch.setattr(builder, "build_rollout_engine", scripted_engine.build_scripted_engine)
        train(scripted_config(tmp_path / "torch", *steps), progress=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           str(Path(__file__).with_name("scripted_worker.py")), "train",
           "--config", str(ROOT / "examples/configs/tiny_cpu_megatron.yaml"), *SCRIPTED, *steps, *layout,
           f"train.output_dir={tmp_path / 'megatron'}", "--no-progress"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert expected in done.stdout + done.stderr
    a, b = _rl_rows(tmp_path / "torch" / "metrics.jsonl"), _rl_rows(tmp_path / "megatron" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        assert ra["rgr/trigger_rate"] == 0.5 and ra["rescue/rate"] == 0.25  # the anchored path ran
        assert [k for k in SCRIPTED_KEYS if k in ra] == [k for k in SCRIPTED_KEYS if k in rb]
        for k in SCRIPTED_KEYS:
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=2e-3, abs=1e-5), (ra["step"], k)
