"""End to end on the embedded default: SFT + RL steps, resume equivalence, bad-step handling.
(CARE's anchored path with closed-form expectations: test_scripted_step.py.)

These run the real trainer (HF rollouts, verifier, CARE / GRPO, packed training) on a shrunken
config: a handful of prompts, short responses, one intra-op thread so runs are bit-reproducible.
"""
import json
import math
from pathlib import Path

import pytest
import torch

from care_megatron.config import load_config
from care_megatron.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]

SMALL = [
    "data.train_size=40", "data.eval_size=4", "data.prompts_per_step=2", "rollout.group_size=4",
    "rollout.max_new_tokens=12", "train.micro_batch_tokens=512", "train.threads=1", "train.init_from=null",
    "train.eval_every=0", "train.save_every=2", "train.sft_steps=6", "train.sft_batch_size=4",
    # the golden metrics and the Megatron parity runs were recorded on this task mix and learning rate;
    # pinned here (on the previous default, tiny_cpu_shapes.yaml) so retuning it leaves these runs unchanged
    "data.tasks=[count_shapes,tallest_bar,triangle_angle,compare_lengths,easy_vqa]", "data.difficulty=[1,2]",
    "train.lr=2.0e-4",
]


def small_config(tmp_path, *extra):
    return load_config(ROOT / "examples/configs/tiny_cpu_shapes.yaml", [*SMALL, f"train.output_dir={tmp_path}", *extra])


def _finite(rows, keys):
    for row in rows:
        for k in keys:
            if k in row:
                assert math.isfinite(row[k]), (k, row)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["care", "grpo"])
def test_sft_then_rl_runs_and_learns_something(tmp_path, algorithm):
    from care_megatron.sft import run_sft
    from care_megatron.trainer import RLTrainer

    config = small_config(tmp_path, f"algorithm.name={algorithm}", "train.steps=2")
    sft_dir = run_sft(config, progress=False)
    sft_rows = read_metrics(sft_dir / "metrics.jsonl")
    assert len(sft_rows) == config.train.sft_steps
    _finite(sft_rows, ["loss", "grad_norm"])
    assert sft_rows[-1]["sft/token_nll"] < sft_rows[0]["sft/token_nll"]

    config = small_config(tmp_path, f"algorithm.name={algorithm}", "train.steps=2", f"train.init_from={sft_dir}")
    trainer = RLTrainer(config, progress=False)
    before = {n: p.detach().clone() for n, p in trainer.backend.model.named_parameters()}
    trainer.run()
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    _finite(rows, ["loss", "grad_norm", "reward/mean", "kl", "entropy", "signal/failure_share"])
    assert all(r["skipped"] == 0 for r in rows)
    changed = sum(not torch.equal(p, before[n]) for n, p in trainer.backend.model.named_parameters())
    if any(r["adv/abs_mean"] > 0 for r in rows):
        assert changed > 0.5 * len(before)
    else:  # GRPO on groups with equal rewards has no learning signal at all (KL is 0 at the reference)
        assert algorithm == "grpo" and changed == 0
    if algorithm == "care":  # CARE always has a signal: anchored contrast or the all-negative rescue
        assert all(r["adv/abs_mean"] > 0 for r in rows)
    # weights reach the engine at the start of each step: it now holds the step-1 update ...
    engine_state = trainer.engine.model.state_dict()
    if changed:
        assert any(not torch.equal(engine_state[n], before[n]) for n in before)
    # ... and one more sync makes it identical to the trainer's policy
    from care_megatron.rollout.colocate import sync_weights

    sync_weights(trainer.backend, trainer.engine, 1 << 20)
    engine_state = trainer.engine.model.state_dict()
    for name, p in trainer.backend.model.state_dict().items():
        assert torch.equal(engine_state[name], p), name
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert (tmp_path / "checkpoints" / "step_000002" / "trainer.pt").exists()
    if algorithm == "care":
        assert "rescue/rate" in rows[0] and "kprime/mean" in rows[0]
    # the final policy is a Hugging Face directory that care-eval scores
    from care_megatron.evaluation.run import run_evaluation

    report = run_evaluation(config, checkpoint=str(tmp_path / "final"), progress=False)
    assert report.num_examples == config.data.eval_size
    assert json.loads((tmp_path / "eval_report.json").read_text())["num_examples"] == config.data.eval_size


def test_loss_decreases_on_a_fixed_batch(tmp_path):
    """Repeated SFT steps on one batch drive its NLL down (the optimiser and backward are wired)."""
    from care_megatron.data.dataset import build_records
    from care_megatron.data.packing import MRopeSpec, pack_sequences
    from care_megatron.models import build_model_and_processor
    from care_megatron.sft import nll_loss_fn, sft_sequence
    from care_megatron.training.registry import build_backend

    config = small_config(tmp_path)
    model, tok, ip = build_model_and_processor(config.model, min_pixels=config.data.min_pixels,
                                               max_pixels=config.data.max_pixels)
    records = [r for r in build_records(config.data).train if r.rationale][:4]
    seqs = [sft_sequence(r, tok, ip, i) for i, r in enumerate(records)]
    packed = pack_sequences(seqs, 512, mrope=MRopeSpec.from_hf_config(model.config))
    backend = build_backend(config, model, lr=3e-3, keep_reference=False)
    n = {"num_tokens": sum(int(s.loss_mask.sum()) for s in seqs)}
    losses = [backend.train_step(packed, nll_loss_fn, n).loss for _ in range(8)]
    assert losses[-1] < 0.7 * losses[0], losses


def _rl_rows(path):
    skip = ("time", "timing/")
    return [{k: v for k, v in r.items() if not k.startswith(skip)} for r in read_metrics(path) if "loss" in r]


@pytest.mark.slow
def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(tmp_path):
    from care_megatron.trainer import train

    full = tmp_path / "full"
    train(small_config(full, "train.steps=4"), progress=False)
    part = tmp_path / "part"
    train(small_config(part, "train.steps=2"), progress=False)
    train(small_config(part, "train.steps=4"), resume=True, progress=False)
    a, b = _rl_rows(full / "metrics.jsonl"), _rl_rows(part / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert a == b


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["dapo", "gspo", "dr_grpo", "rloo"])
def test_every_baseline_runs_a_step(tmp_path, algorithm):
    from care_megatron.trainer import train

    train(small_config(tmp_path, f"algorithm.name={algorithm}", "train.steps=1", "algorithm.dapo_overlong_buffer=4"),
          progress=False)
    (row,) = _rl_rows(tmp_path / "metrics.jsonl")
    _finite([row], ["loss", "grad_norm", "reward/mean", "entropy"])
    assert "rescue/rate" not in row  # CARE-only diagnostics stay out of baseline runs
    if algorithm == "dapo":
        # an untrained model fails every rollout: every group has zero reward variance, is dropped,
        # and the step refills from fresh prompts twice before giving up
        assert row["dapo/dropped_groups"] >= 2 and row["dapo/refill_rounds"] == 2
        assert row["kl"] == 0.0  # DAPO runs without a KL term


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path):
    """Each NaN step is skipped (metrics say so); N in a row stop the run with a clear error."""
    from care_megatron.trainer import RLTrainer
    from care_megatron.training.base import StepResult

    trainer = RLTrainer(small_config(tmp_path, "train.steps=5", "train.max_consecutive_bad_steps=2"), progress=False)
    trainer.backend.train_step = lambda *a, **k: StepResult(loss=float("nan"), grad_norm=float("nan"),
                                                            learning_rate=0.0, skipped=True)
    with pytest.raises(RuntimeError, match="2 consecutive steps"):
        trainer.run()
    rows = _rl_rows(tmp_path / "metrics.jsonl")
    assert [r["skipped"] for r in rows] == [1.0]  # step 1 logged as skipped, step 2 stopped the run


def test_ctrl_c_writes_a_checkpoint_that_resume_continues_from(tmp_path):
    from care_megatron import checkpoint as ckpt
    from care_megatron.trainer import RLTrainer, train

    trainer = RLTrainer(small_config(tmp_path, "train.steps=4", "train.save_every=10"), progress=False)
    real_step = trainer.step

    def interrupted(step):
        if step == 2:
            raise KeyboardInterrupt
        return real_step(step)

    trainer.step = interrupted
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    latest = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    assert latest is not None and latest.name == "step_000002"
    train(small_config(tmp_path, "train.steps=4", "train.save_every=10"), resume=True, progress=False)
    assert [r["step"] for r in _rl_rows(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
