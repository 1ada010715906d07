"""tools/seed_sweep.py: the t-interval, the per-seed summary, and that the frozen run shares the RL run's
seeds, initial policy and prompts (only the learning rate and evaluation differ)."""
import json
import math

import pytest
from _tool_loader import load_tool


@pytest.fixture(scope="module")
def sweep():
    return load_tool("seed_sweep")


def test_mean_interval_closed_form(sweep):
    stat = sweep.mean_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.302652729749464
    assert stat["mean"] == 2.0
    assert stat["high"] - 2.0 == pytest.approx(4.302652729749464 / math.sqrt(3), rel=1e-9)
    assert 2.0 - stat["low"] == pytest.approx(4.302652729749464 / math.sqrt(3), rel=1e-9)
    assert math.isnan(sweep.mean_interval([0.5])["low"])


def test_interval_is_the_one_compare_algorithms_reports(sweep):
    """One t-interval for every tool (care_megatron.stats, checked against scipy in tests/test_stats.py)."""
    from care_megatron import stats

    values = [0.2, 0.5, 0.3, 0.9]
    ours, shared = sweep.mean_interval(values), stats.mean_interval(values)
    assert (ours["mean"], ours["low"], ours["high"], ours["n"]) == (shared["mean"], shared["low"], shared["high"], 4)


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _fake_seed(directory, sft_acc, final_acc, rl_acc, frozen_acc, steps=12, sampled=None):
    rows = [{"step": 0, "eval/accuracy": sft_acc, "eval/accuracy/x": sft_acc}]
    rows += [{"step": s, "loss": 0.0, "accuracy/mean": rl_acc(s)} for s in range(1, steps + 1)]
    rows[-1].update({"eval/accuracy": final_acc, "eval/accuracy/x": final_acc})
    if sampled is not None:  # eval.samples set: eval_sampled/* beside eval/* at every evaluation
        rows[0].update({"eval_sampled/accuracy": sampled[0], "eval_sampled/accuracy/x": sampled[0]})
        rows[-1].update({"eval_sampled/accuracy": sampled[1], "eval_sampled/accuracy/x": sampled[1]})
    _write(directory / "metrics.jsonl", rows)
    _write(directory / "frozen" / "metrics.jsonl",
           [{"step": s, "loss": 0.0, "accuracy/mean": frozen_acc} for s in range(1, steps + 1)])
    (directory / "timings.json").write_text(json.dumps({"sft_s": 10.0, "train_s": 20.0, "frozen_s": 15.0}))


def test_seed_summary_and_report(sweep, tmp_path):
    # steps 1..12; last 10 steps are 3..12 -> mean of s / 20 over 3..12 = 7.5 / 20 = 0.375
    _fake_seed(tmp_path / "seed0", 0.3, 0.5, lambda s: s / 20, 0.25)
    _fake_seed(tmp_path / "seed1", 0.4, 0.5, lambda s: 0.5, 0.3)
    s0 = sweep.seed_summary(tmp_path / "seed0", last=10)
    assert s0["heldout_sft"] == 0.3 and s0["heldout_final"] == 0.5
    assert s0["heldout_gain"] == pytest.approx(0.2)
    assert s0["train_last"] == pytest.approx(0.375)
    assert s0["train_gain_over_frozen"] == pytest.approx(0.125)
    assert s0["per_task"] == {"x": [0.3, 0.5]}
    assert s0["user_commands_s"] == 30.0
    s1 = sweep.seed_summary(tmp_path / "seed1", last=10)
    aggregate, table = sweep.report({0: s0, 1: s1}, last=10)
    assert aggregate["heldout_gain"]["mean"] == pytest.approx(0.15)
    # two seeds: half-width = t(0.975, 1) * sd / sqrt(2), sd of {0.2, 0.1} = 0.0707
    assert aggregate["heldout_gain"]["high"] - 0.15 == pytest.approx(12.706204736174707 * math.sqrt(0.005) / math.sqrt(2),
                                                                     rel=1e-9)
    assert aggregate["train_gain_over_frozen"]["mean"] == pytest.approx((0.125 + 0.2) / 2)
    assert "held-out accuracy (greedy): gain (RL - SFT)" in table and "held-out x: SFT -> RL" in table
    assert "sampled" not in table  # runs without eval.samples have no sampled rows


def test_sampled_heldout_is_summarised_beside_greedy(sweep, tmp_path):
    _fake_seed(tmp_path / "seed0", 0.3, 0.5, lambda s: 0.4, 0.25, sampled=(0.2, 0.45))
    _fake_seed(tmp_path / "seed1", 0.4, 0.5, lambda s: 0.5, 0.3, sampled=(0.1, 0.2))
    s0 = sweep.seed_summary(tmp_path / "seed0", last=10)
    assert (s0["heldout_sampled_sft"], s0["heldout_sampled_final"]) == (0.2, 0.45)
    assert s0["heldout_sampled_gain"] == pytest.approx(0.25) and s0["heldout_gain"] == pytest.approx(0.2)
    assert s0["heldout_sampled_per_task"] == {"x": [0.2, 0.45]} and s0["per_task"] == {"x": [0.3, 0.5]}
    aggregate, table = sweep.report({0: s0, 1: sweep.seed_summary(tmp_path / "seed1", last=10)}, last=10)
    assert aggregate["heldout_sampled_gain"]["mean"] == pytest.approx((0.25 + 0.1) / 2)
    assert aggregate["heldout_gain/x/heldout_sampled"]["mean"] == pytest.approx((0.25 + 0.1) / 2)
    assert aggregate["heldout_gain/x"]["mean"] == pytest.approx(0.15)
    assert "held-out accuracy (sampled, mean@N): gain (RL - SFT)" in table and "held-out x (sampled): SFT -> RL" in table


def test_frozen_run_shares_seeds_policy_and_prompts(sweep, tmp_path, monkeypatch):
    calls = []

    def fake_run(command, config, overrides, log_path):
        calls.append((command, overrides))
        return 1.0

    monkeypatch.setattr(sweep, "run_command", fake_run)
    timings = sweep.run_seed("cfg.yaml", ["train.steps=3"], 2, tmp_path, 1e-10, 3, threads=1)
    assert sorted(c for c, _ in calls) == ["sft", "train", "train"] and calls[0][0] == "sft"
    assert timings == {"sft_s": 1.0, "train_s": 1.0, "frozen_s": 1.0}

    def as_dict(overrides):
        return dict(o.split("=", 1) for o in overrides)  # later keys win, like the config loader

    sft = as_dict(calls[0][1])
    # the RL and frozen runs start side by side: tell them apart by their output directory
    rl, frozen = sorted((as_dict(o) for _, o in calls[1:]), key=lambda d: d["train.output_dir"].endswith("frozen"))
    for key in ("train.seed", "data.seed", "model.init_seed"):
        assert sft[key] == rl[key] == frozen[key] == "2"
    assert rl["train.init_from"] == frozen["train.init_from"] == str(tmp_path / "seed2" / "sft")
    assert float(frozen["train.lr"]) == 1e-10 and "train.lr" not in rl
    assert frozen["data.eval_size"] == "0"
    assert frozen["train.output_dir"] == str(tmp_path / "seed2" / "frozen")
    assert rl["train.output_dir"] == str(tmp_path / "seed2")


def test_finished_phases_are_not_run_again(sweep, tmp_path, monkeypatch):
    _fake_seed(tmp_path / "seed0", 0.3, 0.5, lambda s: 0.5, 0.25, steps=3)
    for sub in ("sft", "final", "frozen/final"):
        (tmp_path / "seed0" / sub).mkdir(parents=True, exist_ok=True)
    (tmp_path / "seed0" / "sft" / "config.json").write_text("{}")
    monkeypatch.setattr(sweep, "run_command", lambda *a: pytest.fail("a finished phase ran again"))
    assert sweep.run_seed(None, [], 0, tmp_path, 1e-10, 3, threads=1)["sft_s"] == 10.0


def test_unfinished_runs_are_compared_over_common_steps(sweep, tmp_path):
    _fake_seed(tmp_path / "seed0", 0.3, 0.5, lambda s: s / 10, 0.25, steps=12)
    frozen = tmp_path / "seed0" / "frozen" / "metrics.jsonl"  # the frozen run only reached step 6
    frozen.write_text("".join(json.dumps({"step": s, "loss": 0.0, "accuracy/mean": 0.25}) + "\n" for s in range(1, 7)))
    summary = sweep.seed_summary(tmp_path / "seed0", last=4)
    assert summary["train_steps"] == [3, 6]
    assert summary["train_last"] == pytest.approx((0.3 + 0.4 + 0.5 + 0.6) / 4)
    assert summary["frozen_last"] == 0.25


def test_format_and_think_length_beside_accuracy(sweep, tmp_path):
    """Held-out format / think length of the SFT policy and after RL, and the RL run's training format /
    think length over the same last steps as its training accuracy, per seed and over seeds."""
    for seed, (think_sft, think_final, drop) in enumerate([(40.0, 10.0, 0.0), (30.0, 20.0, 0.5)]):
        directory = tmp_path / f"seed{seed}"
        _fake_seed(directory, 0.3, 0.5, lambda s: 0.5, 0.25)
        rows = [json.loads(l) for l in (directory / "metrics.jsonl").read_text().splitlines()]
        rows[0].update({"eval/format": 1.0, "eval/think_length": think_sft})
        rows[-1].update({"eval/format": 0.75 - drop, "eval/think_length": think_final})
        for row in rows[1:]:  # steps 1..12: format 1 - step / 100, think length 50 - step
            row.update({"format/mean": 1.0 - row["step"] / 100, "length/think_mean": 50.0 - row["step"]})
        _write(directory / "metrics.jsonl", rows)
    s0 = sweep.seed_summary(tmp_path / "seed0", last=10)
    assert (s0["heldout_format_sft"], s0["heldout_format_final"]) == (1.0, 0.75)
    assert (s0["heldout_think_length_sft"], s0["heldout_think_length_final"]) == (40.0, 10.0)
    # last 10 steps are 3..12: mean step 7.5
    assert s0["train_format_last"] == pytest.approx(1.0 - 0.075)
    assert s0["train_think_length_last"] == pytest.approx(50.0 - 7.5)
    s1 = sweep.seed_summary(tmp_path / "seed1", last=10)
    aggregate, table = sweep.report({0: s0, 1: s1}, last=10)
    assert aggregate["heldout_think_length_final"]["mean"] == pytest.approx(15.0)
    # two seeds {10, 20}: sd = 7.071, half-width = t(0.975, 1) * sd / sqrt(2) = 12.7062 * 5
    assert aggregate["heldout_think_length_final"]["high"] == pytest.approx(15.0 + 12.706204736174707 * 5.0, rel=1e-9)
    assert aggregate["heldout_format_final"]["mean"] == pytest.approx(0.5)
    assert aggregate["train_think_length_last"]["mean"] == pytest.approx(42.5)
    line = next(l for l in table.splitlines() if l.startswith("held-out think length (greedy), after RL"))
    assert line[52:].split()[:2] == ["10.000", "20.000"]  # cells after the 52-wide label
    line = next(l for l in table.splitlines() if l.startswith("held-out format (greedy), after RL"))
    assert line[52:].split()[:2] == ["0.750", "0.250"]
    assert "training format, last 10 steps, RL" in table and "training think length, last 10 steps, RL" in table


def test_runs_without_rationale_metrics_have_no_such_rows(sweep, tmp_path):
    _fake_seed(tmp_path / "seed0", 0.3, 0.5, lambda s: 0.5, 0.25)
    s0 = sweep.seed_summary(tmp_path / "seed0", last=10)
    assert not any("format" in k or "think" in k for k in s0)
    aggregate, table = sweep.report({0: s0}, last=10)
    assert "format" not in table and "think" not in table and "heldout_format_final" not in aggregate
