"""tools/paper_figures.py on hand-built run records (metrics.jsonl + groups.jsonl written here, no training):
the fig2 fit against its closed form, ΔAcc@H with dropped triggers, fig6's paired deltas, the token AUC of a
piecewise-linear curve, the variant -> overrides conversion of the ablation files, the run plan of a small-pool
figure, and that --runs mode writes every figure's PNG and JSON."""
import json
import math
from pathlib import Path

import pytest
from _tool_loader import load_tool

ROOT = Path(__file__).resolve().parents[2]
ABLATIONS = ROOT / "examples/configs/ablations"
TINY_CPU = ROOT / "examples/configs/tiny_cpu.yaml"


@pytest.fixture(scope="module")
def tool():
    return load_tool("paper_figures")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _group(step, prompt, accuracy, **care):
    return {"step": step, "prompt_id": prompt, "group": care.pop("group", 0), "method": "care", "accuracy": accuracy,
            "reward_mean": accuracy, "all_negative": accuracy == 0.0, "decoded_tokens": 10, **care}


# ------------------------------------------------------------------------------------ variants -> overrides
def test_variant_overrides_of_an_ablation_file(tool):
    assert tool.variant_overrides(ABLATIONS / "k2_eq_off.yaml") == [
        "algorithm.name=care", "algorithm.rgr=true", "algorithm.care.k=2", "algorithm.care.equalize=false"]
    assert tool.variant_overrides(ABLATIONS / "table2_grpo.yaml") == ["algorithm.name=grpo"]


@pytest.mark.parametrize("path", sorted(ABLATIONS.glob("*.yaml")), ids=lambda p: p.stem)
def test_variant_on_the_base_config_equals_the_ablation_file(tool, path):
    """The overrides on top of tiny_cpu.yaml give the config the ablation file itself loads (output_dir aside):
    the base's own algorithm fields (format_weight) stay, the variant's replace theirs."""
    from care_megatron.config.loader import load_config

    ours = load_config(TINY_CPU, [*tool.variant_overrides(path), f"train.output_dir=runs/ablations/{path.stem}"])
    assert ours == load_config(path)
    assert ours.algorithm.format_weight == 0.5  # from the base, not from the variant


def test_variant_refuses_changes_outside_the_algorithm_section(tool, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: ../tiny_cpu.yaml\nalgorithm:\n  name: care\ntrain:\n  output_dir: x\n  steps: 5\n")
    with pytest.raises(ValueError, match="'train.steps'"):
        tool.variant_overrides(bad)
    bad.write_text("algorithm:\n  name: care\ndata:\n  train_size: 5\n")
    with pytest.raises(ValueError, match="'data.train_size'"):
        tool.variant_overrides(bad)
    with pytest.raises(ValueError, match="no .*nonexistent.yaml"):
        tool.variant_file("nonexistent")


def test_override_values_read_back_as_written(tool):
    from care_megatron.config.loader import parse_overrides

    block = {"name": "1e-3", "flag": "true", "care": {"neg_scale": 1e-5, "k": 2, "rule": "random", "none": None},
             "list": [1, "a"], "empty": {}}
    assert parse_overrides(tool.flatten_overrides("algorithm", block)) == {"algorithm": block}


# ------------------------------------------------------------------------------------ fig2
def test_signature_fit_equals_the_closed_form(tool):
    # exact theory: z_anchor = sqrt(K'), each negative -1/sqrt(K') -> slope 1, intercept 0, r 1 everywhere
    groups = [_group(1, f"p{k}", 0.5, anchored=True, k_prime=k, anchor_z=math.sqrt(k), neg_z=[-1 / math.sqrt(k)] * k)
              for k in (1, 2, 4, 4)]
    groups.append(_group(1, "rescue", 0.0, anchored=False, rescue=True, k_prime=4, anchor_z=None, neg_z=[]))
    result = tool.signature(tool.signature_points(groups))
    for side in ("anchor", "negative", "pooled"):
        fit = result["fit"][side]
        assert fit["slope"] == pytest.approx(1.0) and fit["intercept"] == pytest.approx(0.0, abs=1e-12)
        assert fit["r"] == pytest.approx(1.0)
    assert result["groups"] == 4 and result["anchor_points"] == 4 and result["negative_points"] == 1 + 2 + 4 + 4
    bucket = result["per_kprime"]["4"]
    assert bucket["groups"] == 2 and bucket["neg_points"] == 8
    assert bucket["anchor"]["mean"] == pytest.approx(2.0) and bucket["neg"]["mean"] == pytest.approx(-0.5)
    assert bucket["anchor"]["half_width"] == pytest.approx(0.0)

    # anchors z = 2 sqrt(K') + 1 over K' = 1, 4, 9: slope 2, intercept 1; negatives at -1/sqrt(K') plus noise
    groups = [_group(1, "a", 0.5, anchored=True, k_prime=k, anchor_z=2 * math.sqrt(k) + 1, neg_z=[-1 / math.sqrt(k) + e])
              for k, e in ((1, 0.1), (4, -0.1), (9, 0.0))]
    result = tool.signature(tool.signature_points(groups))
    assert result["fit"]["anchor"]["slope"] == pytest.approx(2.0)
    assert result["fit"]["anchor"]["intercept"] == pytest.approx(1.0)
    # negatives: x = -1, -0.5, -1/3; y = x + (0.1, -0.1, 0): hand OLS
    x, y = [-1, -0.5, -1 / 3], [-0.9, -0.6, -1 / 3]
    mx, my = sum(x) / 3, sum(y) / 3
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    assert result["fit"]["negative"]["slope"] == pytest.approx(sxy / sxx)
    assert result["fit"]["negative"]["r"] == pytest.approx(sxy / math.sqrt(sxx * syy))
    # one K' only: the theory has no spread, no fit
    assert tool.ols([2.0, 2.0], [1.0, 3.0])["slope"] is None


# ------------------------------------------------------------------------------------ fig7 / fig12
def test_accuracy_gain_over_the_horizon_with_dropped_triggers(tool):
    groups = [
        _group(1, "a", 0.0), _group(1, "b", 0.0, group=1),
        _group(2, "c", 0.25),
        _group(3, "a", 0.5), _group(3, "d", 0.0),
        _group(4, "a", 1.0), _group(4, "c", 0.75),
        _group(6, "a", 1.0),  # step 6 > 1 + H: outside a's horizon
        _group(7, "b", 1.0), _group(7, "d", 0.0, group=1),
    ]
    triggers = [g for g in groups if g["all_negative"]]  # a@1, b@1, d@3, d@7
    gains = tool.accuracy_gains(groups, triggers, horizon=3)
    # a@1: steps (1, 4] hold a at 3 (0.5) and 4 (1.0): gain 0.75; b@1: next seen at 7 > 4: dropped;
    # d@3: next at 7 > 6: dropped; d@7: nothing after the last step: dropped and censored
    assert [(g["prompt_id"], g["step"], g["gain"], g["revisits"]) for g in gains["gains"]] == [("a", 1, 0.75, 2)]
    assert (gains["kept"], gains["dropped"], gains["censored"]) == (1, 3, 1)
    assert gains["mean"] == 0.75
    # with H = 6, b@1 and d@3 are kept: b 1.0 - 0, d (0.0 at 7) - 0; a now averages steps 3, 4, 6
    wide = tool.accuracy_gains(groups, triggers, horizon=6)
    assert {(g["prompt_id"], g["step"]): g["gain"] for g in wide["gains"]} == pytest.approx(
        {("a", 1): 2.5 / 3, ("b", 1): 1.0, ("d", 3): 0.0})
    # fig12: the trigger's own accuracy is subtracted (c: 0.25 at step 2, 0.75 at step 4)
    c = tool.accuracy_gains(groups, [groups[2]], horizon=3)
    assert c["gains"][0]["gain"] == pytest.approx(0.5) and c["gains"][0]["accuracy_t"] == 0.25


# ------------------------------------------------------------------------------------ fig6
def test_paired_deltas_by_step_and_smoothing(tool):
    base = {1: 0.5, 2: 0.4, 3: 0.3, 5: 0.1}
    variant = {1: 0.2, 2: 0.4, 3: 0.0, 4: 9.0, 5: 0.3}
    assert tool.paired_deltas(base, variant) == pytest.approx({1: -0.3, 2: 0.0, 3: -0.3, 5: 0.2})
    # trailing mean of 2 over the paired steps: 1: -0.3, 2: -0.15, 3: -0.15, 5: -0.05
    assert tool.paired_deltas(base, variant, window=2) == pytest.approx({1: -0.3, 2: -0.15, 3: -0.15, 5: -0.05})


# ------------------------------------------------------------------------------------ tokens
def test_token_auc_of_a_piecewise_linear_curve(tool):
    curve = [(0.0, 0.2), (100.0, 0.4), (300.0, 0.4)]
    # over [0, 200]: (0.2 + 0.4) / 2 * 100 + 0.4 * 100 = 70, / 200
    assert tool.normalised_auc(curve, 0.0, 200.0) == pytest.approx(0.35)
    # over [50, 150]: the curve is 0.3 at 50: (0.3 + 0.4) / 2 * 50 + 0.4 * 50 = 37.5, / 100
    assert tool.normalised_auc(curve, 50.0, 150.0) == pytest.approx(0.375)
    assert tool.common_range([curve, [(0.0, 0.1), (200.0, 0.3)], [(10.0, 0.1), (250.0, 0.2)]]) == (10.0, 200.0)
    assert tool.normalised_auc(curve, 5.0, 5.0) is None


def test_cumulative_tokens_exact_or_estimated(tool, tmp_path):
    rows = [{"step": 0, "eval/accuracy": 0.1}, {"step": 1, "loss": 0.0, "tokens/decoded": 100, "length/response_mean": 1.0},
            {"step": 2, "loss": 0.0, "tokens/decoded": 50, "length/response_mean": 1.0}]
    _write_jsonl(tmp_path / "a" / "metrics.jsonl", rows)
    tokens, source = tool.cumulative_tokens(tool.load_run(tmp_path / "a"))
    assert (tokens, source) == ({0: 0.0, 1: 100.0, 2: 150.0}, "exact")
    # one step without tokens/decoded: the run is marked an estimate; that step is estimated (groups/count x G x
    # mean length), the step that logged the exact count keeps it
    del rows[2]["tokens/decoded"]
    for row in rows[1:]:
        row["groups/count"] = 2.0
    _write_jsonl(tmp_path / "b" / "metrics.jsonl", rows)
    (tmp_path / "b" / "config.yaml").write_text("data:\n  prompts_per_step: 2\nrollout:\n  group_size: 4\n")
    tokens, source = tool.cumulative_tokens(tool.load_run(tmp_path / "b"))
    assert (tokens, source) == ({0: 0.0, 1: 100.0, 2: 108.0}, "estimate")


# ------------------------------------------------------------------------------------ whole figures from fake runs
STEPS = 8


def _fake_run(directory: Path, seed: int, variant: str) -> Path:
    """8 steps, evaluation at 0, 4 and 8; 4 prompts seen every 2 steps (p0, p1 on odd steps, p2, p3 on even)."""
    shift = 0.01 * seed + 0.02 * (sum(map(ord, variant)) % 5)
    rows = []
    for step in range(STEPS + 1):
        row = {"step": step}
        if step:
            row.update({"loss": 0.0, "reward/mean": 0.5, "accuracy/mean": 0.4, "kl": 0.01 * step + shift,
                        "clip_frac/neg_adv_answer": 0.1 + shift, "adv/neg_var_ratio": 0.5 + shift + 0.01 * step,
                        "adv/anchor_mean": 1.0 + shift, "update/param_norm": 0.1 + shift, "tokens/decoded": 100 + step,
                        "length/response_mean": 5.0, "groups/count": 2.0})
        if step % 4 == 0:
            acc = 0.2 + 0.05 * step + shift
            row.update({"eval/accuracy": acc, "eval/macro_accuracy": acc, "eval_sampled/accuracy": acc - 0.1,
                        "eval_sampled/macro_accuracy": acc - 0.1})
        rows.append(row)
    groups = []
    for step in range(1, STEPS + 1):
        for i, prompt in enumerate(("p0", "p1") if step % 2 else ("p2", "p3")):
            accuracy = 0.0 if (step + i + seed) % 3 == 0 else 0.5
            groups.append(_group(step, prompt, accuracy, group=i, anchored=accuracy > 0, rescue=accuracy == 0,
                                 k_prime=2 + i, anchor_z=math.sqrt(2 + i) if accuracy > 0 else None,
                                 neg_z=[-1 / math.sqrt(2 + i)] * (2 + i) if accuracy > 0 else [],
                                 rgr_triggered=accuracy > 0 and i == 0, rgr_correct=None, rgr_tokens=0))
    _write_jsonl(directory / "metrics.jsonl", rows)
    _write_jsonl(directory / "groups.jsonl", groups)
    (directory / "final").mkdir(parents=True, exist_ok=True)
    return directory


def test_runs_mode_writes_every_figure(tool, tmp_path, capsys):
    variants = sorted({v for f in tool.FIGURES.values() for v in f.variants})
    args = ["all", "--out", str(tmp_path / "figs"), "--runs"]
    for v in variants:
        args.append(f"{v}=" + ",".join(str(_fake_run(tmp_path / "runs" / v / f"s{s}", s, v)) for s in range(2)))
    result = tool.main([*args, "--horizon", "2", "--smooth", "1"])
    assert result["errors"] == {}
    for name in tool.FIGURES:
        assert (tmp_path / "figs" / f"{name}.png").stat().st_size > 1000
        payload = json.loads((tmp_path / "figs" / f"{name}.json").read_text())
        assert payload["figure"] == name and payload["command"].startswith("python tools/paper_figures.py all")
        assert set(payload["runs"]) == set(tool.FIGURES[name].variants)
    fig2 = json.loads((tmp_path / "figs" / "fig2.json").read_text())
    assert fig2["fit"]["pooled"]["slope"] == pytest.approx(1.0) and fig2["fit"]["pooled"]["r"] == pytest.approx(1.0)
    assert set(fig2["per_kprime"]) == {"2", "3"}
    # fig6: every variant's clip rate is 0.1 + shift, so the delta is a per-variant constant over steps
    fig6 = json.loads((tmp_path / "figs" / "fig6.json").read_text())
    shift = {v: 0.02 * (sum(map(ord, v)) % 5) for v in ("neg_scale_0p25", "neg_scale_1p0")}
    assert fig6["variants"]["neg_scale_0p25"]["clip_frac/neg_adv_answer"]["mean_delta"]["mean"] == pytest.approx(
        shift["neg_scale_0p25"] - shift["neg_scale_1p0"])
    assert "neg_scale_1p0" not in fig6["variants"]
    # fig7: a prompt comes back 2 steps later, inside H = 2, except triggers at steps 7 and 8
    fig7 = json.loads((tmp_path / "figs" / "fig7.json").read_text())
    on = fig7["variants"]["table2_care"]
    assert on["kept"] + on["dropped"] == sum(1 for s in range(2) for step in range(1, 9) for i in range(2)
                                             if (step + i + s) % 3 == 0)
    assert on["censored"] == on["dropped"] and "on_minus_off" in fig7
    # tokens: exact counts; the step-8 total is sum(100 + step) = 836
    tokens = json.loads((tmp_path / "figs" / "tokens.json").read_text())
    assert tokens["token_source"]["table2_care"] == {"0": "exact", "1": "exact"}
    assert tokens["eval/accuracy"]["token_range"] == [0.0, 836.0]
    out = capsys.readouterr().out
    assert "== fig12" in out and "ΔAcc@2" in out


def test_fig7_gain_and_update_norm_on_triggered_steps(tool, tmp_path):
    """One seed, hand-picked: prompt q all-negative at step 1 (norm 0.3) and solved half at step 2."""
    directory = tmp_path / "r"
    _write_jsonl(directory / "metrics.jsonl", [{"step": 1, "loss": 0.0, "update/param_norm": 0.3},
                                               {"step": 2, "loss": 0.0, "update/param_norm": 0.1}])
    _write_jsonl(directory / "groups.jsonl", [_group(1, "q", 0.0), _group(2, "q", 0.5), _group(2, "q", 0.5)])
    args = tool.build_parser().parse_args(["fig7", "--out", str(tmp_path)])
    result, _ = tool.figure_fig7(tool.FIGURES["fig7"], {"table2_care": {0: tool.load_run(directory)}}, args,
                                 tmp_path / "fig7.png")
    entry = result["variants"]["table2_care"]
    assert entry["gains"]["0"]["gains"][0]["gain"] == 0.5 and entry["kept"] == 1 and entry["dropped"] == 0
    assert entry["param_norm_triggered"] == {"0": [0.3]}
    assert entry["param_norm_other_steps_per_seed_mean"]["mean"] == pytest.approx(0.1)


def test_config_mode_plans_small_pool_runs_and_prints_sbatch_lines(tool, tmp_path, capsys):
    out = tmp_path / "out"
    result = tool.main(["fig7", "--config", str(TINY_CPU), "--out", str(out), "--seeds", "2", "--slurm",
                        "train.steps=3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert result == {"sbatch": 4} and len(lines) == 4
    # 4 x prompts_per_step (8) prompts: a prompt comes back within 7 steps
    assert all("data.train_size=32" in l and "train.steps=3" in l for l in lines)
    assert sum("algorithm.care.rescue=false" in l for l in lines) == 2
    assert any(f"train.output_dir={out}/runs/rescue_off.train_size32/seed1" in l for l in lines)
    # the user's data.train_size replaces the default, and names the directory
    plan = tool.plan_runs([tool.FIGURES["fig7"], tool.FIGURES["fig5"]], str(TINY_CPU), ["data.train_size=16"], 1, out)
    keys = sorted(r.key for r in plan)
    assert keys == sorted(["table2_care.train_size16", "rescue_off.train_size16", "table2_care", "selector_random",
                           "selector_mixed", "selector_farthest"])
    assert all("data.train_size=32" not in r.overrides for r in plan)


def test_variants_of_the_same_experiment_share_one_run(tool, tmp_path):
    """neg_scale_0p5 (writes s = 0.5 out), k4_eq_on (K = 4, Eq on) and reflect_neg_scale_0p25 are CARE's defaults:
    whichever figure asks first, they draw table2_care's runs; a variant that changes a value does not."""
    out = tmp_path / "out"
    plan = tool.plan_runs([tool.FIGURES["fig6"], tool.FIGURES["fig9_10"], tool.FIGURES["fig5"]], str(TINY_CPU), [], 1, out)
    by_key = {r.key: r for r in plan}
    assert "neg_scale_0p5" not in by_key and "k4_eq_on" not in by_key
    assert by_key["table2_care"].uses == {("fig6", "neg_scale_0p5"), ("fig9_10", "k4_eq_on"), ("fig5", "table2_care")}
    assert by_key["neg_scale_0p25"].uses == {("fig6", "neg_scale_0p25")}
    assert len(plan) == 3 + 5 + 4  # fig6: 0.25 / 0.75 / 1.0 + shared; fig9_10: five of its own; fig5: four
    small = tool.plan_runs([tool.FIGURES["fig12"], tool.FIGURES["fig7"]], str(TINY_CPU), [], 1, out)
    assert sorted(r.key for r in small) == sorted(["table2_care.train_size32", "reflect_neg_scale_0p1.train_size32",
                                                   "reflect_neg_scale_0p5.train_size32", "reflect_neg_scale_1p0.train_size32",
                                                   "rescue_off.train_size32"])
    assert tool.canonical_variants(str(TINY_CPU), [], ["selector_random", "neg_scale_0p5"]) == {
        "selector_random": "selector_random", "neg_scale_0p5": "table2_care"}


def test_a_run_trained_with_other_overrides_is_not_reused(tool, tmp_path, capsys):
    out = tmp_path / "out"
    (run,) = [r for r in tool.plan_runs([tool.FIGURES["fig2"]], str(TINY_CPU), ["train.steps=2"], 1, out)]
    _fake_run(run.directory, 0, "table2_care")
    tool.write_record(run, str(TINY_CPU))
    tool.check_record(run, str(TINY_CPU))  # same overrides: fine
    result = tool.main(["fig2", "--config", str(TINY_CPU), "--out", str(out), "--seeds", "1", "--no-run", "train.steps=2"])
    assert "fig2" in result["figures"] and (out / "fig2.png").exists()
    with pytest.raises(SystemExit):
        tool.main(["fig2", "--config", str(TINY_CPU), "--out", str(out), "--seeds", "1", "--no-run", "train.steps=5"])
    assert "was trained with config" in capsys.readouterr().err


def test_local_training_commands_without_training(tool, tmp_path, monkeypatch, capsys):
    """--jobs 2: one `python -m care_megatron.cli train` process per run with train.threads=1, --resume where a
    checkpoint folder exists; --jobs 1: compare_algorithms.run_locally in this process. Training itself is faked."""
    out = tmp_path / "out"
    plan = tool.plan_runs([tool.FIGURES["fig7"]], str(TINY_CPU), ["train.init_from=null"], 1, out, threads_one=True)
    assert all(r.overrides[-1] == "train.threads=1" for r in plan)
    (plan[1].directory / "checkpoints").mkdir(parents=True)
    calls = []

    class Done:
        returncode = 0

    def fake_run(argv, **kwargs):
        calls.append(argv)
        Done.returncode = 1 if "algorithm.care.rescue=false" in argv else 0
        return Done()

    monkeypatch.setattr(tool.subprocess, "run", fake_run)
    failed = tool.train_runs(plan, str(TINY_CPU), jobs=2)
    assert failed == ["rescue_off.train_size32/seed0"]
    by_dir = {next(a for a in argv if a.startswith("train.output_dir=")): argv for argv in calls}
    first = by_dir[f"train.output_dir={plan[0].directory}"]
    assert first[1:5] == ["-m", "care_megatron.cli", "train", "--config"] and "--resume" not in first
    assert "--resume" in by_dir[f"train.output_dir={plan[1].directory}"]
    record = json.loads((plan[0].directory / tool.RUN_RECORD).read_text())
    assert "train.threads=1" not in record["overrides"] and "data.train_size=32" in record["overrides"]
    printed = capsys.readouterr().out
    assert printed.count("start ") == 2 and "FAILED" in printed and "trained 1 of 2 runs" in printed

    local = []
    monkeypatch.setattr(tool.compare, "run_locally", lambda config, overrides, directory: local.append(directory))
    assert tool.train_runs(plan, str(TINY_CPU), jobs=1) == [] and local == [r.directory for r in plan]
    missing = tool.plan_runs([tool.FIGURES["fig2"]], str(TINY_CPU), ["train.init_from=/nonexistent/sft"], 1, out)
    with pytest.raises(ValueError, match="train.init_from: /nonexistent/sft does not exist"):
        tool.train_runs(missing, str(TINY_CPU), jobs=1)
