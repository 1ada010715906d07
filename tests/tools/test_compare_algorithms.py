"""tools/compare_algorithms.py: paired deltas and training accuracy against hand-computed values, decoded-token accounting,
and a tiny end-to-end comparison (2 methods x 2 seeds x 1 step) that writes the table / JSON / PNGs
and does not re-run finished runs."""
import json
import math
import shutil
from pathlib import Path

import pytest
from _tool_loader import load_tool

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tool():
    return load_tool("compare_algorithms")


def test_delta_to_grpo_is_paired_by_seed(tool):
    def summary(macro, per_task):
        return {"macro": macro, "per_task": per_task, "mechanisms": {k: 0.1 for k, _ in tool.MECHANISMS},
                "accuracy_curve": [], "kl_curve": []}

    runs = {"grpo": {0: summary(0.2, {"a": 0.1}), 1: summary(0.4, {"a": 0.3}), 2: summary(0.3, {"a": 0.2})},
            "care": {0: summary(0.3, {"a": 0.2}), 1: summary(0.6, {"a": 0.5}), 2: summary(0.3, {"a": 0.2})}}
    result = tool.aggregate(runs)
    delta = result["table"]["care"]["macro"]["delta_vs_grpo"]
    # per-seed differences 0.1, 0.2, 0.0: mean 0.1, sd 0.1, half width 4.3026527 * 0.1 / sqrt(3)
    assert delta["mean"] == pytest.approx(0.1)
    assert delta["half_width"] == pytest.approx(4.302652729749464 * 0.1 / math.sqrt(3), rel=1e-9)
    assert "delta_vs_grpo" not in result["table"]["grpo"]["macro"]
    assert result["table"]["care"]["a"]["mean"] == pytest.approx(0.3)
    # GRPO macro 0.2 / 0.4 / 0.3: sd 0.1, half width 4.3026527 * 0.1 / sqrt(3) = 0.248
    assert "| grpo | 0.200 ± 0.248 | 0.300 ± 0.248 | - |" in tool.markdown_table(result)
    assert result["table_sampled"] is None and "sampled" not in tool.markdown_table(result)


def test_sampled_heldout_table_beside_the_greedy_one(tool):
    def summary(macro, sampled_macro):
        return {"macro": macro, "per_task": {"a": macro}, "mechanisms": {k: 0.1 for k, _ in tool.MECHANISMS},
                "accuracy_curve": [], "kl_curve": [],
                "sampled": {"macro": sampled_macro, "per_task": {"a": sampled_macro}, "accuracy_curve": []}}

    runs = {"grpo": {0: summary(0.5, 0.2), 1: summary(0.5, 0.4)}, "care": {0: summary(0.5, 0.5), 1: summary(0.5, 0.5)}}
    result = tool.aggregate(runs)
    assert result["table"]["care"]["macro"]["delta_vs_grpo"]["mean"] == pytest.approx(0.0)
    delta = result["table_sampled"]["care"]["macro"]["delta_vs_grpo"]  # per seed 0.3, 0.1
    assert delta["mean"] == pytest.approx(0.2)
    assert delta["half_width"] == pytest.approx(12.706204736174707 * math.sqrt(0.02) / math.sqrt(2), rel=1e-9)
    table = tool.markdown_table(result)
    assert "method (held-out, greedy)" in table and "method (held-out, sampled, mean@N)" in table
    assert "| care | 0.500 ± 0.000 | 0.500 ± 0.000 | +0.200 ± 1.271 |" in table
    # from logged rows: the last eval_sampled/* row
    rows = [{"step": 0, "eval/accuracy": 0.5, "eval/macro_accuracy": 0.5, "eval_sampled/accuracy": 0.1,
             "eval_sampled/macro_accuracy": 0.1, "eval_sampled/accuracy/a": 0.1},
            {"step": 1, "reward/mean": 0.0, "accuracy/mean": 0.2, "length/response_mean": 3.0, "eval/accuracy": 0.6,
             "eval/macro_accuracy": 0.6, "eval_sampled/accuracy": 0.3, "eval_sampled/macro_accuracy": 0.3,
             "eval_sampled/accuracy/a": 0.3}]
    sampled = tool.run_summary(rows, prompts_per_step=2, group_size=4)["sampled"]
    assert sampled["macro"] == 0.3 and sampled["per_task"] == {"a": 0.3}
    assert sampled["accuracy_curve"] == [(0.0, 0.1), (24.0, 0.3)]


def test_training_accuracy_first_and_last_window_and_paired_delta(tool):
    # 12 steps with accuracy/mean = step / 100: first 10 steps mean 0.055, last 10 mean 0.075
    rows = [{"step": 0, "eval/accuracy": 0.5, "eval/macro_accuracy": 0.5}]
    rows += [{"step": k, "reward/mean": 0.0, "accuracy/mean": k / 100} for k in range(1, 13)]
    summary = tool.run_summary(rows, prompts_per_step=2, group_size=4)
    assert summary["training_accuracy"]["first"] == pytest.approx(0.055)
    assert summary["training_accuracy"]["last"] == pytest.approx(0.075)
    assert summary["training_accuracy"]["gain"] == pytest.approx(0.02)
    # trailing 5-step mean at step 12: (8 + 9 + 10 + 11 + 12) / 500; at step 2: (1 + 2) / 200
    curve = summary["train_accuracy_curve"]
    assert len(curve) == 12 and curve[-1][1] == pytest.approx(0.10) and curve[1][1] == pytest.approx(0.015)
    assert [x for x, _ in curve] == sorted(x for x, _ in curve)
    short = tool.run_summary(rows[:4], prompts_per_step=2, group_size=4)  # 3 steps: both windows are all of them
    assert short["training_accuracy"]["first"] == short["training_accuracy"]["last"] == pytest.approx(0.02)

    def run(last):
        return {"macro": 0.5, "per_task": {}, "mechanisms": {k: 0.1 for k, _ in tool.MECHANISMS},
                "training_accuracy": {"first": 0.3, "last": last, "gain": last - 0.3}}

    result = tool.aggregate({"grpo": {0: run(0.4), 1: run(0.5)}, "care": {0: run(0.6), 1: run(0.6)}})
    delta = result["training_accuracy"]["care"]["last"]["delta_vs_grpo"]  # per seed 0.2, 0.1
    assert delta["mean"] == pytest.approx(0.15) and delta["n"] == 2
    assert result["training_accuracy"]["grpo"]["gain"]["mean"] == pytest.approx(0.15)
    assert "| care | 0.300 ± 0.000 | 0.600 ± 0.000 | +0.300 ± 0.000 | +0.150 ± 0.635 |" in tool.markdown_table(result)


def test_decoded_tokens_from_logged_metrics(tool):
    # CARE with RGR, reflected samples inside length/response_mean: (4 groups x 8 + 2 reflected) x 10
    assert tool.decoded_tokens({"length/response_mean": 10.0, "groups/count": 4.0, "rgr/trigger_rate": 0.5}, 4, 8) == 340.0
    # baseline without groups/count: prompts_per_step x group size
    assert tool.decoded_tokens({"length/response_mean": 5.0}, 3, 2) == 30.0
    # reflected samples logged separately under rgr/*
    row = {"length/response_mean": 10.0, "groups/count": 4.0, "rgr/trigger_rate": 0.5, "rgr/length/think_mean": 3.0,
           "rgr/length/response_mean": 20.0}
    assert tool.decoded_tokens(row, 4, 8) == 4 * 8 * 10 + 2 * 20
    # DAPO decodes the dropped groups too
    assert tool.decoded_tokens({"length/response_mean": 2.0, "dapo/kept_groups": 2.0, "dapo/dropped_groups": 1.0}, 2, 4) == 24.0
    # the trainer's exact count wins over the estimate when logged
    assert tool.decoded_tokens({"length/response_mean": 2.0, "groups/count": 4.0, "tokens/decoded": 123.0}, 4, 8) == 123.0


def test_band_interpolates_onto_a_shared_grid(tool):
    result = tool.band([[(0, 0.0), (10, 1.0)], [(0, 0.0), (8, 0.4)]], points=5)
    assert result["x"] == pytest.approx([0, 2, 4, 6, 8])
    # at x = 8: 0.8 and 0.4 -> mean 0.6
    assert result["mean"][-1] == pytest.approx(0.6)
    assert result["low"][-1] < 0.6 < result["high"][-1]


def _write_run(directory, clip_neg_answer, approx_kl, think_final, with_new_keys=True):
    """A fabricated metrics.jsonl: evaluation at step 0, steps 1..3, the final evaluation merged into step 3
    (as the trainer logs it). Step 2 logs clip_frac/neg_adv_answer as NaN (no such token that step)."""
    rows = [{"step": 0, "eval/accuracy": 0.5, "eval/macro_accuracy": 0.5, "eval/format": 1.0, "eval/think_length": 40.0}]
    for step in (1, 2, 3):
        row = {"step": step, "reward/mean": 0.5, "accuracy/mean": 0.5, "length/think_mean": 30.0}
        if with_new_keys:
            row.update({"clip_frac/all": 0.1 * step, "clip_frac/neg_adv_answer": clip_neg_answer[step - 1],
                        "ppo/approx_kl": approx_kl[step - 1], "ppo/updates": 4.0})
        rows.append(row)
    rows[-1].update({"eval/accuracy": 0.6, "eval/macro_accuracy": 0.6, "eval/format": 0.75})
    if with_new_keys:  # an older run logged eval/format but no think length and no PPO-update metrics
        rows[-1]["eval/think_length"] = think_final
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def test_ppo_update_and_heldout_rationale_per_method(tool, tmp_path):
    nan = float("nan")
    runs = {"grpo": {0: _write_run(tmp_path / "g0", [0.2, nan, 0.4], [0.01, 0.02, 0.03], 20.0),
                     1: _write_run(tmp_path / "g1", [0.0, 0.1, 0.2], [0.03, 0.04, 0.05], 10.0)},
            "care": {0: _write_run(tmp_path / "c0", [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], 30.0, with_new_keys=False)}}
    summaries = {m: {s: tool.run_summary(tool.read_rows(d), prompts_per_step=2, group_size=4) for s, d in seeds.items()}
                 for m, seeds in runs.items()}
    g0 = summaries["grpo"][0]
    # mean over the steps that logged a finite value: (0.2 + 0.4) / 2; clip_frac/all (0.1 + 0.2 + 0.3) / 3
    assert g0["ppo_update"]["clip_frac/neg_adv_answer"] == pytest.approx(0.3)
    assert g0["ppo_update"]["clip_frac/all"] == pytest.approx(0.2)
    assert g0["ppo_update"]["ppo/approx_kl"] == pytest.approx(0.02)
    assert g0["ppo_update"]["clip_frac/dual"] is None  # never logged
    assert g0["heldout_rationale"] == {"eval/format": 0.75, "eval/think_length": 20.0, "eval_sampled/format": None,
                                       "eval_sampled/think_length": None}
    assert summaries["care"][0]["ppo_update"]["clip_frac/neg_adv_answer"] is None  # an older run
    assert summaries["care"][0]["heldout_rationale"]["eval/think_length"] is None  # final evaluation lacks it

    result = tool.aggregate(summaries)
    # grpo over seeds: neg_adv_answer {0.3, 0.1}: mean 0.2, sd sqrt(0.02), half width t(0.975, 1) * sd / sqrt(2) = 1.2706
    stat = result["ppo_update"]["grpo"]["clip_frac/neg_adv_answer"]
    assert stat["mean"] == pytest.approx(0.2) and stat["n"] == 2
    assert stat["half_width"] == pytest.approx(12.706204736174707 * math.sqrt(0.02) / math.sqrt(2), rel=1e-9)
    assert result["ppo_update"]["grpo"]["ppo/approx_kl"]["mean"] == pytest.approx(0.03)  # {0.02, 0.04}
    think = result["heldout_rationale"]["grpo"]["eval/think_length"]  # {20, 10}: half width 12.7062 * 5
    assert think["mean"] == pytest.approx(15.0) and think["half_width"] == pytest.approx(12.706204736174707 * 5.0)
    assert result["ppo_update"]["care"]["clip_frac/neg_adv_answer"]["n"] == 0
    table = tool.markdown_table(result)
    assert "| method (held-out, final) | format (greedy) | think length (greedy) |" in table  # no sampled columns
    assert "| grpo | 0.750 ± 0.000 | 15.000 ± 63.531 |" in table
    assert "| care | 0.750 | - |" in table  # one seed: no interval; no think length logged
    head = next(l for l in table.splitlines() if l.startswith("| method (PPO update"))
    assert head == "| method (PPO update, mean over steps) | clip frac, all | A < 0, answer (Fig. 6) | approx. KL |"
    assert "| grpo | 0.200 ± 0.000 | 0.200 ± 1.271 | 0.030 ± 0.127 |" in table
    assert "| care | - | - | - |" in table
    json.dumps(result)  # the JSON summary carries them


def test_older_runs_without_the_new_keys_keep_the_old_tables(tool, tmp_path):
    rows = tool.read_rows(_write_run(tmp_path / "old", [0.0] * 3, [0.0] * 3, 0.0, with_new_keys=False))
    result = tool.aggregate({"grpo": {0: tool.run_summary(rows, prompts_per_step=2, group_size=4)}})
    table = tool.markdown_table(result)
    assert "PPO update" not in table and "format (greedy)" in table and "think length (greedy)" not in table
    assert "failure-signal share" in table  # the mechanism table keeps all its columns


def test_methods_offer_the_baselines_and_select_them(tool):
    from care_megatron.config.loader import load_config

    for method in ("grpo", "dapo", "gspo", "care_no_rgr", "care"):
        assert method in tool.METHODS
        config = load_config(None, tool.METHODS[method])
        assert config.algorithm.name == method.replace("_no_rgr", "")
    assert load_config(None, tool.METHODS["care_no_rgr"]).algorithm.rgr is False
    assert load_config(None, tool.METHODS["care"]).algorithm.rgr is True


TINY = ["train.init_from=null", "train.steps=1", "train.eval_every=1", "train.save_every=1",
        "data.tasks=[count_shapes,compare_lengths]", "data.train_size=8", "data.eval_size=4",
        "data.prompts_per_step=2", "train.prompts_per_update=1", "rollout.group_size=4", "rollout.max_new_tokens=6"]


@pytest.mark.slow
def test_tiny_comparison_writes_outputs_and_resumes(tool, tmp_path, capsys):
    args = ["--config", str(ROOT / "examples/configs/tiny_cpu.yaml"), *TINY, "--methods", "grpo", "care",
            "--seeds", "2", "--out", str(tmp_path)]
    first = tool.main(args)
    assert sorted(first["executed"]) == ["care/seed0", "care/seed1", "grpo/seed0", "grpo/seed1"]
    for name in ("table.md", "summary.json", "accuracy_vs_tokens.png", "train_accuracy_vs_tokens.png", "kl.png",
                 "sampled_accuracy_vs_tokens.png"):  # the default config sets eval.samples
        assert (tmp_path / name).stat().st_size > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tasks"] == ["compare_lengths", "count_shapes"]
    for method in ("grpo", "care"):
        macro = summary["table"][method]["macro"]
        assert macro["n"] == 2 and 0.0 <= macro["mean"] <= 1.0 and macro["half_width"] is not None
        for seed in ("0", "1"):
            run = summary["runs"][method][seed]
            assert run["decoded_tokens"] > 0 and run["final_step"] == 1
            assert run["accuracy_curve"][0][0] == 0 and run["accuracy_curve"][-1][0] == run["decoded_tokens"]
    assert "delta_vs_grpo" in summary["table"]["care"]["macro"]
    assert summary["table_sampled"]["care"]["macro"]["n"] == 2
    assert summary["mechanisms"]["care"]["signal/failure_share"]["n"] == 2
    assert "| care |" in capsys.readouterr().out

    # finished runs are not re-run; the aggregate is the same
    again = tool.main(args)
    assert again["executed"] == [] and again["table"] == first["table"]

    # a run without its final policy is unfinished: only it runs again (resuming from its checkpoint)
    shutil.rmtree(tmp_path / "runs" / "care" / "seed1" / "final")
    third = tool.main(args)
    assert third["executed"] == ["care/seed1"] and third["table"] == first["table"]


def test_slurm_prints_one_sbatch_line_per_unfinished_run(tool, tmp_path, capsys):
    config = str(ROOT / "examples/configs/qwen2_5_vl_7b.yaml")
    result = tool.main(["--config", config, "--methods", "grpo", "care_no_rgr",
                        "--seeds", "2", "--out", str(tmp_path), "--slurm"])
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("sbatch")]
    assert result == {"sbatch": 4} and len(lines) == 4
    assert f"--export=ALL,CONFIG={config}" in lines[0]
    assert "algorithm.rgr=false" in lines[2] and "train.seed=0" in lines[2]
    assert lines[0].endswith("--resume") and f"train.output_dir={tmp_path}/runs/grpo/seed0" in lines[0]
