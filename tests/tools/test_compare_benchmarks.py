"""tools/compare_algorithms.py --benchmarks: Table 1 (mean and t-interval over seeds per method, beside the paper's
rows) and Table 2 (GRPO / CARE w/o RGR / CARE with the paired-by-seed difference to GRPO) from finished runs'
benchmark summaries, against hand-computed values; no training and no decoding (``--no-run`` over fabricated
runs whose ``bench/<protocol>/<method>/seed<k>/`` folders are already finished)."""
import json
import math

import pytest
from _tool_loader import load_tool

T_975_DOF2 = 4.302652729749464  # the 0.975 quantile of Student's t with 2 degrees of freedom
STEPS = 3
ACCURACY = {  # method -> benchmark -> accuracy of the runs of seeds 0, 1, 2
    "grpo": {"mathvista": [0.5, 0.6, 0.7], "mmmu": [0.2, 0.2, 0.5]},
    "care_no_rgr": {"mathvista": [0.6, 0.6, 0.9], "mmmu": [0.3, 0.4, 0.5]},
    "care": {"mathvista": [0.7, 0.8, 0.9], "mmmu": [0.3, 0.4, 0.5]},
}
BENCHMARKS = "mathvista=/data/MathVista,mmmu=/data/MMMU"


@pytest.fixture(scope="module")
def tool():
    return load_tool("compare_algorithms")


def _half(values):
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return T_975_DOF2 * sd / math.sqrt(len(values))


def _fake_runs(out, protocol="greedy", seeds=1):
    """Finished runs (metrics up to STEPS, a final/ folder) and their finished benchmark folders."""
    decoding = {"protocol": protocol, "temperature": 0.0 if protocol == "greedy" else 1.0, "top_p": 1.0, "top_k": -1,
                "seeds": seeds}
    for method, per_benchmark in ACCURACY.items():
        for seed in range(3):
            run = out / "runs" / method / f"seed{seed}"
            (run / "final").mkdir(parents=True)
            rows = [{"step": 0, "eval/accuracy": 0.5, "eval/macro_accuracy": 0.5}] + \
                [{"step": s, "reward/mean": 0.5, "accuracy/mean": 0.5} for s in range(1, STEPS + 1)]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            bench = out / "bench" / protocol / method / f"seed{seed}"
            bench.mkdir(parents=True)
            results = {name: {"n": 10, "accuracy": values[seed]} for name, values in per_benchmark.items()}
            summary = {"results": results, "macro_accuracy": sum(v["accuracy"] for v in results.values()) / 2,
                       "macro_over": list(per_benchmark), "decoding": dict(decoding, seed=seed)}
            (bench / "summary.json").write_text(json.dumps(summary))


def _macro(method):
    return [(a + b) / 2 for a, b in zip(ACCURACY[method]["mathvista"], ACCURACY[method]["mmmu"])]


def test_table1_and_table2_from_finished_runs(tool, tmp_path, capsys):
    _fake_runs(tmp_path)
    result = tool.main(["--out", str(tmp_path), "--no-run", "--seeds", "3", "--benchmarks", BENCHMARKS,
                        f"train.steps={STEPS}", "model.name=/models/Qwen2.5-VL-7B-Instruct"])
    assert result["executed"] == [] and result["scored"] == []
    table = result["table1"]["table"]
    assert table["grpo"]["mathvista"]["mean"] == pytest.approx(0.6)
    assert table["grpo"]["mathvista"]["half_width"] == pytest.approx(T_975_DOF2 * 0.1 / math.sqrt(3), rel=1e-9)
    assert table["grpo"]["macro"]["mean"] == pytest.approx(0.45)  # macro per seed 0.35, 0.40, 0.60
    assert table["grpo"]["macro"]["half_width"] == pytest.approx(T_975_DOF2 * math.sqrt(0.0175) / math.sqrt(3), rel=1e-9)
    # CARE - GRPO macro per seed: 0.15, 0.20, 0.10 -> mean 0.15, sd 0.05
    delta = table["care"]["macro"]["delta_vs_grpo"]
    assert delta["mean"] == pytest.approx(0.15) and delta["half_width"] == pytest.approx(T_975_DOF2 * 0.05 / math.sqrt(3))
    assert table["care_no_rgr"]["macro"]["delta_vs_grpo"]["mean"] == pytest.approx(0.1)  # 0.1 at every seed
    assert table["care_no_rgr"]["macro"]["delta_vs_grpo"]["half_width"] == pytest.approx(0.0, abs=1e-12)
    assert result["table1"]["protocol"] == "greedy" and result["table1"]["benchmarks"] == ["mathvista", "mmmu"]
    assert list(result["table2"]) == ["grpo", "care_no_rgr", "care"]

    table1 = (tmp_path / "table1.md").read_text()
    assert (tmp_path / "bench" / "greedy" / "table1.md").read_text() == table1
    # the paper's rows for the base model matched from model.name, then ours in Table 1's column order
    assert "| Qwen2.5-VL-7B + CARE (paper) | 74.7 | 56.8 | 32.6 | 62.5 | 39.7 | 37.1 | 50.6 |" in table1
    grpo = (f"| grpo | 60.0 ± {100 * _half([0.5, 0.6, 0.7]):.1f} | — | — | 30.0 ± {100 * _half([0.2, 0.2, 0.5]):.1f} "
            f"| — | — | 45.0 ± {100 * _half(_macro('grpo')):.1f} (over 2) |")
    assert grpo == "| grpo | 60.0 ± 24.8 | — | — | 30.0 ± 43.0 | — | — | 45.0 ± 32.9 (over 2) |"
    assert grpo in table1
    assert "| care | 80.0 ± 24.8 | — | — | 40.0 ± 24.8 | — | — | 60.0 ± 24.8 (over 2) |" in table1
    assert "over the 3 training seed(s)" in table1 and "Protocol: greedy — one greedy decode per example." in table1
    assert "Base model Qwen2.5-VL-7B." in table1

    table2 = (tmp_path / "table2.md").read_text()
    lines = table2.splitlines()
    assert lines[0].startswith("| Method | Anchor | RGR | MathVista<sub>mini</sub> |") and lines[0].endswith("| Avg. | vs GRPO |")
    assert "| GRPO (Baseline) | ✗ | ✗ | 60.0 ± 24.8 | — | — | 30.0 ± 43.0 | — | — | 45.00 ± 32.86 | — |" in lines
    assert "| CARE w/o RGR | ✓ | ✗ | 70.0 ± 43.0 | — | — | 40.0 ± 24.8 | — | — | 55.00 ± 32.86 | +10.00 ± 0.00 |" in lines
    assert "| CARE | ✓ | ✓ | 80.0 ± 24.8 | — | — | 40.0 ± 24.8 | — | — | 60.00 ± 24.84 | +15.00 ± 12.42 |" in lines
    # per-benchmark paired deltas: CARE - GRPO MathVista 0.2 at every seed, MMMU 0.1, 0.2, 0.0
    assert f"| CARE | +20.0 ± 0.0 | — | — | +10.0 ± {100 * _half([0.1, 0.2, 0.0]):.1f} | — | — | +15.00 ± 12.42 |" in lines
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["table1"]["table"]["care"]["macro"]["delta_vs_grpo"]["mean"] == pytest.approx(0.15)
    assert "table" in summary and (tmp_path / "table.md").exists()  # the held-out table is still written
    assert "| CARE | ✓ | ✓ |" in capsys.readouterr().out


def test_paper_protocol_reads_its_own_bench_folder(tool, tmp_path):
    _fake_runs(tmp_path, protocol="paper", seeds=3)
    result = tool.main([f"train.steps={STEPS}", "eval.protocol=paper", "eval.seeds=3", "eval.published_base=Qwen2.5-VL-3B",
                        "--out", str(tmp_path), "--no-run", "--seeds", "3", "--benchmarks", BENCHMARKS,
                        "--methods", "grpo", "care"])
    assert result["scored"] == [] and result["table1"]["protocol"] == "paper"
    table1 = (tmp_path / "bench" / "paper" / "table1.md").read_text()
    assert "Protocol: paper — temperature 1.0, top-p 1.0, 3 seeds per example; accuracy = mean over seeds." in table1
    assert "| Qwen2.5-VL-3B + CARE (paper) |" in table1 and "Qwen2.5-VL-7B" not in table1
    table2 = (tmp_path / "table2.md").read_text()
    assert "CARE w/o RGR" not in table2 and "| CARE | ✓ | ✓ |" in table2
    # a folder of another protocol, or of another seed count, is not a finished one (care-eval refuses to mix them)
    folder = tmp_path / "bench" / "paper" / "grpo" / "seed0"
    names = {"mathvista": "/d", "mmmu": "/d"}
    assert tool.bench_finished(folder, names, "paper", 3)
    assert not tool.bench_finished(folder, names, "paper", 5)
    assert not tool.bench_finished(folder, names, "greedy", 1)
    assert not tool.bench_finished(folder, dict(names, mathverse="/d"), "paper", 3)  # a benchmark not scored there
    assert tool.bench_dir(tmp_path, "paper", "grpo", 0) == folder


def test_slurm_with_benchmarks_leaves_scoring_to_the_aggregate_call(tool, tmp_path, capsys):
    result = tool.main(["--out", str(tmp_path), "--slurm", "--seeds", "1", "--methods", "grpo",
                        "--benchmarks", BENCHMARKS])
    captured = capsys.readouterr()
    assert result == {"sbatch": 1} and "scored by the aggregate call" in captured.err
    assert not (tmp_path / "bench").exists()
    with pytest.raises(SystemExit):
        tool.main(["--out", str(tmp_path), "--no-run", "--benchmarks", "mmbench=/d"])
