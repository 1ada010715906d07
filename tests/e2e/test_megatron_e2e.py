"""The RL loop on the Megatron-Core backend (TP=2, CP=2 or PP=2; gloo, CPU) reproduces the plain-PyTorch backend's
metrics from the same seed and weights (issue 6 end to end)."""
import json
import os
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
    # groups.jsonl (rank 0) holds both ranks' groups once per step, the resumed step not duplicated, and
    # tokens/decoded sums both ranks' rollouts
    groups = [json.loads(line) for line in (tmp_path / "groups.jsonl").read_text().splitlines()]
    assert [(g["step"], g["group"]) for g in groups] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for r in rows:
        assert r["tokens/decoded"] == sum(g["decoded_tokens"] for g in groups if g["step"] == r["step"]) > 0


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
                        "groups/anchored_rate", "kprime/mean", "signature/pearson", "clip_frac/all", "adv/anchor_mean",
                        "update/param_norm", "tokens/decoded", "tokens/rgr_decoded"]
UPDATE_KEYS = ["ppo/updates", "ppo/ratio_mean", "ppo/ratio_min", "ppo/ratio_max", "ppo/approx_kl", "clip_frac/pos_adv",
               "clip_frac/neg_adv", "clip_frac/dual"]
"""With several updates per step the ratios leave 1 and the clips act: these must agree too."""


def _scripted_torchrun(tmp_path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``care_megatron.cli train`` on 2 ranks with the scripted rollout engine (scripted_worker.py),
    tiny_cpu_megatron.yaml + the scripted step's overrides."""
    from test_scripted_step import SCRIPTED

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           str(Path(__file__).with_name("scripted_worker.py")), "train",
           "--config", str(ROOT / "examples/configs/tiny_cpu_megatron.yaml"), *SCRIPTED, *overrides,
           f"train.output_dir={tmp_path}", "--no-progress"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=None if env is None else {**os.environ, **env})
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout,expected,updates", [
    # the one-update variants are extended: the two-update ones run the same path, then a second update
    pytest.param(["parallel.tensor_model_parallel_size=2"], "TP=2 PP=1 CP=1", [], marks=pytest.mark.extended),
    pytest.param(["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=2"], "TP=1 PP=2 CP=1",
                 [], marks=pytest.mark.extended),
    (["parallel.tensor_model_parallel_size=2"], "TP=2 PP=1 CP=1", ["train.prompts_per_update=2"]),
    (["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=2"], "TP=1 PP=2 CP=1",
     ["train.prompts_per_update=2"]),
], ids=["tp2", "pp2", "tp2_2updates", "pp2_2updates"])
def test_megatron_matches_torch_backend_on_the_anchored_path(tmp_path, monkeypatch, layout, expected, updates):
    """The scripted step (anchored groups with RGR success and failure, rescue, saturated group; see
    test_scripted_step.py) on Megatron equals the torch backend's loss, gradient norm and metrics;
    also with two optimizer updates per step (update 2 off the behaviour policy: ratios, clips)."""
    pytest.importorskip("megatron.core")
    import scripted_engine
    from test_scripted_step import scripted_config

    from care_megatron.trainer import train

    steps = ["train.steps=2", "train.save_every=2", *updates]
    with monkeypatch.context() as patch:
        import care_megatron.rollout.builder as builder

        patch.setattr(builder, "build_rollout_engine", scripted_engine.build_scripted_engine)
        train(scripted_config(tmp_path / "torch", *steps), progress=False)
    done = _scripted_torchrun(tmp_path / "megatron", *steps, *layout)
    assert expected in done.stdout + done.stderr
    a, b = _rl_rows(tmp_path / "torch" / "metrics.jsonl"), _rl_rows(tmp_path / "megatron" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2]
    keys = SCRIPTED_KEYS + (UPDATE_KEYS if updates else [])
    for ra, rb in zip(a, b):
        assert ra["rgr/trigger_rate"] == 0.5 and ra["rescue/rate"] == 0.25  # the anchored path ran
        assert ra["ppo/updates"] == (2.0 if updates else 1.0)
        if updates:  # update 2 ran off the behaviour policy and clipped
            assert ra["ppo/ratio_max"] > 1.28 and ra["clip_frac/pos_adv"] > 0
        assert [k for k in keys if k in ra] == [k for k in keys if k in rb]
        for k in keys:
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=2e-3, abs=1e-5), (ra["step"], k)


@pytest.mark.slow
@pytest.mark.distributed
def test_megatron_data_parallel_updates_see_global_minibatch_normalisers(tmp_path):
    """DP=2 with two updates per step: each rank holds two prompt groups (the scripted slots 0 and 1:
    anchored with a successful / a failed RGR), one per update. Every update's normalisers are the
    sums over both ranks of that mini-batch's counts, the same on both ranks: N_seq 2 x 3 (rows 1, 3
    and the reflection of row 2) for update 1, 2 x 4 (rows 4, 6, 7 and the failed reflection) for
    update 2; 2 x 5 sequences each."""
    pytest.importorskip("megatron.core")
    record = tmp_path / "updates"
    record.mkdir()
    done = _scripted_torchrun(tmp_path / "run", "train.steps=1", "parallel.tensor_model_parallel_size=1",
                              "train.prompts_per_update=2", env={"CARE_TEST_RECORD_UPDATES": str(record)})
    assert "TP=1 PP=1 CP=1 DP=2" in done.stdout + done.stderr
    seen = {rank: [json.loads(line) for line in (record / f"rank{rank}.jsonl").read_text().splitlines()]
            for rank in range(2)}
    assert [len(calls) for calls in seen.values()] == [2, 2]  # one train_step per mini-batch on each rank
    for update, (n_seq, n_adv) in enumerate([(5, 3), (5, 4)]):
        local = [seen[rank][update]["local"] for rank in range(2)]
        for counts in local:  # each rank's own mini-batch: one group + its RGR row
            assert (counts["num_sequences"], counts["num_advantaged_sequences"]) == (n_seq, n_adv)
        for rank in range(2):
            normalisers = seen[rank][update]["seen"]
            for key in ("num_sequences", "num_advantaged_sequences", "num_tokens"):
                assert normalisers[key] == local[0][key] + local[1][key], (update, rank, key)
            assert normalisers["max_response_length"] == 40.0
    (row,) = _rl_rows(tmp_path / "run" / "metrics.jsonl")
    assert row["ppo/updates"] == 2.0 and row["groups/count"] == 4.0
