"""The benchmark protocol: batched single decodes through a RolloutEngine, per-example JSONL, resume,
bootstrap intervals, macro average, the Table 1 markdown beside the paper's rows, and the chart."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from _benchmark_rows import two_benchmarks

from care_megatron.evaluation.benchmark_eval import (
    bootstrap_interval, evaluate_benchmarks, load_judge, load_published, parse_benchmark_paths, published_base,
)
from care_megatron.rollout.base import Completion, SamplingParams


class ScriptedEngine:
    """A RolloutEngine that answers each request from a script (request id -> response text), recording batches."""

    def __init__(self, tokenizer, script: dict[str, str]):
        self.tokenizer, self.script, self.batches = tokenizer, script, []
        self.stop_token_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>")]

    def generate(self, requests, sampling):
        self.batches.append([r.request_id for r in requests])
        out = []
        for r in requests:
            assert r.pixel_values is not None and r.image_grid_thw.shape[0] == len(r.images)
            ids = self.tokenizer(self.script[r.request_id], add_special_tokens=False)["input_ids"] + self.stop_token_ids
            out.append(Completion(r.request_id, ids, self.script[r.request_id], [0.0] * len(ids), "stop"))
        return out

    def update_weights(self, named_tensors):
        raise AssertionError("evaluation never updates weights")


def _fixtures(tmp_path, n_vista=6, n_vision=4):
    return two_benchmarks(tmp_path, n_vista, n_vision, corrupt_row=True)


def _script(n_vista=6, n_vision=4):
    # MathVista: even pids right, odd wrong (3 of 6). MMMU-Pro vision: one right of 4, one without a span.
    script = {f"mathvista/{i}": f"<think>count</think><answer>{i if i % 2 == 0 else i + 1}</answer>" for i in range(n_vista)}
    script.update({f"mmmu_pro_vision/v{i}": "<think>look</think><answer>A</answer>" for i in range(n_vision)})
    script["mmmu_pro_vision/v0"] = "<think>look</think><answer>(J)</answer>"
    script["mmmu_pro_vision/v1"] = "J"
    return script


SAMPLING = dict(temperature=0.0, top_p=1.0, max_new_tokens=16, seed=0)


def test_scores_jsonl_table_chart_and_resume(tmp_path, tokenizer, image_processor):
    paths = _fixtures(tmp_path)
    engine = ScriptedEngine(tokenizer, _script())
    sampling = SamplingParams(stop_token_ids=engine.stop_token_ids, **SAMPLING)
    out = tmp_path / "eval"
    model = "/models/Qwen2.5-VL-7B-Instruct"
    report = evaluate_benchmarks(engine, tokenizer, image_processor, paths, out, sampling, batch_size=4,
                                 model_name=model, progress=False)
    assert [len(b) for b in engine.batches] == [4, 4, 2]  # 6 + 4 examples in batches of 4; the corrupt row skipped
    vista, vision = report.results["mathvista"], report.results["mmmu_pro_vision"]
    assert (vista.n, vista.accuracy, vista.skipped) == (6, 0.5, {"unreadable_image": 1})
    assert (vision.n, vision.accuracy) == (4, 0.25)
    assert report.macro_accuracy == pytest.approx(0.375) and report.macro_over == ["mathvista", "mmmu_pro_vision"]
    assert vista.ci_low <= 0.5 <= vista.ci_high and 0 <= vision.ci_low <= 0.25 <= vision.ci_high <= 1
    assert report.macro_ci[0] <= 0.375 <= report.macro_ci[1]
    rows = [json.loads(line) for line in (out / "mmmu_pro_vision.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"mmmu_pro_vision/v{i}" for i in range(4)]
    first = rows[0]
    assert set(first) >= {"id", "prompt", "response", "extracted", "score", "reason"}
    assert (first["response"], first["extracted"], first["score"]) == ("<think>look</think><answer>(J)</answer>", "J", 1.0)
    assert (rows[1]["score"], rows[1]["reason"]) == (0.0, "no <answer> span")
    assert "<|vision_start|><|image_pad|><|vision_end|>Answer the multiple-choice question" in first["prompt"]
    decoding = json.loads((out / "decoding.json").read_text())
    assert (decoding["temperature"], decoding["max_new_tokens"], decoding["decodes_per_example"]) == (0.0, 16, 1)
    table = (out / "table.md").read_text()
    # the paper's Qwen2.5-VL-7B rows (matched from the model path) above ours, in Table 1's column order
    assert "| Qwen2.5-VL-7B (paper) | 68.6 | 49.2 | 22.4 | 61.3 | 36.3 | 32.8 | 45.1 |" in table
    assert "| Qwen2.5-VL-7B + CARE (paper) | 74.7 | 56.8 | 32.6 | 62.5 | 39.7 | 37.1 | 50.6 |" in table
    ours = [line for line in table.splitlines() if line.startswith("| ours |")][0]
    assert ours.startswith("| ours | 50.0 [") and "| — | — | — | — | 25.0 [" in ours and ours.endswith(f"| 37.5 [{100 * report.macro_ci[0]:.1f}, {100 * report.macro_ci[1]:.1f}] (over 2) |")
    assert (out / "benchmarks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["results"]["mathvista"]["accuracy"] == 0.5

    # resume: nothing left to decode; then a lost line (and a line cut mid-write) are decoded again
    again = evaluate_benchmarks(engine, tokenizer, image_processor, paths, out, sampling, batch_size=4,
                                model_name=model, progress=False)
    assert len(engine.batches) == 3 and again.macro_accuracy == report.macro_accuracy
    lines = (out / "mathvista.jsonl").read_text().splitlines()
    (out / "mathvista.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])
    evaluate_benchmarks(engine, tokenizer, image_processor, paths, out, sampling, batch_size=4, model_name=model,
                        progress=False)
    assert engine.batches[-1] == ["mathvista/4", "mathvista/5"]
    with pytest.raises(ValueError, match="another eval.output_dir"):
        evaluate_benchmarks(engine, tokenizer, image_processor, paths, out,
                            SamplingParams(stop_token_ids=engine.stop_token_ids, **dict(SAMPLING, max_new_tokens=32)),
                            model_name=model, progress=False)
    with pytest.raises(ValueError, match="another eval.output_dir"):
        evaluate_benchmarks(engine, tokenizer, image_processor, paths, out, sampling, model_name="/models/other",
                            progress=False)


def test_judge_is_recorded_and_used_for_open_answers(tmp_path, tokenizer, image_processor):
    paths = _fixtures(tmp_path, n_vista=2, n_vision=1)
    engine = ScriptedEngine(tokenizer, _script(2, 1))
    sampling = SamplingParams(stop_token_ids=engine.stop_token_ids, **SAMPLING)
    judge, name = load_judge("_benchmark_judges:always_half")
    report = evaluate_benchmarks(engine, tokenizer, image_processor, paths, tmp_path / "eval", sampling,
                                 judge=judge, judge_name=name, progress=False)
    assert report.results["mathvista"].accuracy == 0.5 and report.results["mmmu_pro_vision"].accuracy == 1.0
    assert report.decoding["judge"] == "_benchmark_judges:always_half"
    assert "judge=_benchmark_judges:always_half" in (tmp_path / "eval" / "table.md").read_text()
    with pytest.raises(ValueError, match="eval.judge"):
        load_judge("no_such_module_xyz:judge")


def test_bootstrap_interval_closed_forms():
    assert bootstrap_interval([1.0] * 50) == (1.0, 1.0)
    assert bootstrap_interval([0.0] * 50) == (0.0, 0.0)
    low, high = bootstrap_interval([0.0, 1.0] * 200, samples=2000)
    half_width = 1.96 * math.sqrt(0.25 / 400)  # normal approximation of the binomial mean's interval
    assert low == pytest.approx(0.5 - half_width, abs=0.01) and high == pytest.approx(0.5 + half_width, abs=0.01)
    assert all(math.isnan(v) for v in bootstrap_interval([]))
    assert bootstrap_interval([0.0, 1.0, 1.0], seed=3) == bootstrap_interval([0.0, 1.0, 1.0], seed=3)


def test_benchmark_paths_and_published_numbers():
    assert parse_benchmark_paths("mathvista=/d/MV, mmmu=/d/MMMU") == {"mathvista": "/d/MV", "mmmu": "/d/MMMU"}
    with pytest.raises(ValueError, match="unknown benchmark 'mmbench'"):
        parse_benchmark_paths("mmbench=/d")
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_benchmark_paths("mathvista")
    table = load_published()
    assert "Table 1" in table["source"]
    rows = {r["model"]: r for r in table["rows"]}
    assert rows["Qwen3-VL-8B-Instruct + CARE"]["scores"]["mmmu_pro_vision"] == 41.7
    assert rows["GPT-4o"]["scores"]["mathvision"] is None
    # the paper's headline claim: CARE beats GRPO by 4.6 macro points on Qwen2.5-VL-7B
    macro = {m: np.mean(list(rows[m]["scores"].values())) for m in ("Qwen2.5-VL-7B + CARE", "Qwen2.5-VL-7B + GRPO")}
    assert macro["Qwen2.5-VL-7B + CARE"] - macro["Qwen2.5-VL-7B + GRPO"] == pytest.approx(4.62, abs=0.01)
    assert published_base("Qwen/Qwen2.5-VL-3B-Instruct", table) == "Qwen2.5-VL-3B"
    assert published_base("/ckpt/qwen3_vl_8b_care", table) == "Qwen3-VL-8B"
    assert published_base("tiny_qwen2_5_vl", table) is None


def test_eval_config_section(tmp_path):
    from care_megatron.config import load_config

    config = load_config(None, [f"eval.benchmarks.mathvista={tmp_path}", "eval.limit=5"])
    assert config.eval.benchmarks == {"mathvista": str(tmp_path)} and config.eval.limit == 5
    assert config.eval.judge is None  # the judge is off by default
    with pytest.raises(ValueError, match="config field 'eval.benchmarks'"):
        load_config(None, ["eval.benchmarks.mmbench=/d"])


@pytest.mark.slow
def test_care_eval_command_on_the_tiny_model(tmp_path, capsys):
    """``care-eval --benchmarks`` end to end: the tiny random Qwen2.5-VL policy decodes every fixture example once."""
    from care_megatron.cli import main

    paths = _fixtures(tmp_path, n_vista=3, n_vision=2)
    out = tmp_path / "eval"
    argv = ["--benchmarks", ",".join(f"{k}={v}" for k, v in paths.items()), "--no-progress",
            f"train.output_dir={tmp_path}", f"eval.output_dir={out}", "rollout.max_new_tokens=8", "rollout.batch_size=4"]
    assert main("eval", argv) == 0
    printed = capsys.readouterr().out
    assert "| Qwen2.5-VL-7B (paper) | 68.6 |" in printed and "| ours |" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert {k: v["n"] for k, v in summary["results"].items()} == {"mathvista": 3, "mmmu_pro_vision": 2}
    assert summary["decoding"]["temperature"] == 0.0 and summary["decoding"]["max_new_tokens"] == 8
    rows = [json.loads(line) for line in (out / "mathvista.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(0.0 <= r["score"] <= 1.0 and r["reason"] for r in rows)
    assert (out / "benchmarks.png").exists()
    assert main("eval", argv) == 0  # resumed: every example already scored
    assert len((out / "mathvista.jsonl").read_text().splitlines()) == 3


def test_training_subset_scores_the_first_examples_of_each_benchmark(tmp_path, tokenizer, image_processor):
    from care_megatron.config import load_config
    from care_megatron.evaluation.benchmark_eval import TrainingBenchmarkSubset

    paths = _fixtures(tmp_path)
    assert TrainingBenchmarkSubset.from_config(load_config(None, [])) is None  # off by default
    config = load_config(None, [f"eval.benchmarks.{k}={v}" for k, v in paths.items()] +
                         ["eval.train_subset=3", "rollout.batch_size=4"])
    subset = TrainingBenchmarkSubset.from_config(config)
    assert [r.id for _, r in subset.items] == ["mathvista/0", "mathvista/1", "mathvista/2",
                                               "mmmu_pro_vision/v0", "mmmu_pro_vision/v1", "mmmu_pro_vision/v2"]
    engine = ScriptedEngine(tokenizer, _script())
    metrics = subset.metrics(engine, tokenizer, image_processor, SamplingParams(stop_token_ids=engine.stop_token_ids, **SAMPLING))
    # MathVista pids 0, 2 right and 1 wrong; MMMU-Pro vision v0 right, v1 without a span, v2 wrong
    assert metrics == pytest.approx({"bench/mathvista": 2 / 3, "bench/mmmu_pro_vision": 1 / 3, "bench/macro": 0.5})
    assert [len(b) for b in engine.batches] == [4, 2] and not (tmp_path / "eval").exists()


@pytest.mark.slow
def test_trainer_logs_benchmark_subset_metrics(tmp_path):
    from care_megatron.config import load_config
    from care_megatron.metrics import read_metrics
    from care_megatron.trainer import train
    from pathlib import Path

    paths = _fixtures(tmp_path / "data", n_vista=2, n_vision=2)
    root = Path(__file__).resolve().parents[2]
    config = load_config(root / "examples/configs/tiny_cpu.yaml", [
        "data.train_size=8", "data.eval_size=2", "data.prompts_per_step=2", "train.prompts_per_update=null",
        "rollout.group_size=2",
        "rollout.max_new_tokens=8", "train.steps=1", "train.eval_every=1", "train.init_from=null", "train.threads=1",
        "algorithm.rgr=false", f"train.output_dir={tmp_path / 'run'}", "eval.train_subset=2",
        *[f"eval.benchmarks.{k}={v}" for k, v in paths.items()]])
    train(config, progress=False)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "bench/macro" in r]
    assert rows and all(0.0 <= rows[-1][k] <= 1.0 for k in ("bench/mathvista", "bench/mmmu_pro_vision", "bench/macro"))


def _reasoning_script(n_vista=6, n_vision=4):
    """``_script`` written in <reasoning> tags, the rationale mentioning the <answer> tag (only a reader of the
    reasoning tags sees where it ends: the default tags would take `` tags</reasoning><answer>...`` as the answer)."""
    return {key: text.replace("<think>", "<reasoning>I put it in <answer> tags: ").replace("</think>", "</reasoning>")
            for key, text in _script(n_vista, n_vision).items()}


def test_reasoning_tags_reach_the_benchmark_prompts_scores_and_decoding_record(tmp_path, tokenizer, image_processor):
    from care_megatron.rewards.parsing import REASONING_TAGS

    paths = _fixtures(tmp_path)
    engine = ScriptedEngine(tokenizer, _reasoning_script())
    sampling = SamplingParams(stop_token_ids=engine.stop_token_ids, **SAMPLING)
    out = tmp_path / "eval"
    report = evaluate_benchmarks(engine, tokenizer, image_processor, paths, out, sampling, batch_size=4,
                                 progress=False, tags=REASONING_TAGS)
    # the same scores as the <think> script
    assert (report.results["mathvista"].accuracy, report.results["mmmu_pro_vision"].accuracy) == (0.5, 0.25)
    rows = [json.loads(line) for line in (out / "mmmu_pro_vision.jsonl").read_text().splitlines()]
    assert rows[0]["extracted"] == "J" and "<reasoning>" in rows[0]["prompt"] and "<think>" not in rows[0]["prompt"]
    assert json.loads((out / "decoding.json").read_text())["think_tag"] == "reasoning"
    with pytest.raises(ValueError, match="another eval.output_dir"):  # <think> results must not be mixed in
        evaluate_benchmarks(engine, tokenizer, image_processor, paths, out, sampling, progress=False)
    # the default tags leave the record as it was, so result folders written before data.think_tag resume
    evaluate_benchmarks(ScriptedEngine(tokenizer, _script()), tokenizer, image_processor, paths, tmp_path / "think",
                        sampling, progress=False)
    assert "think_tag" not in json.loads((tmp_path / "think" / "decoding.json").read_text())


def test_training_subset_reads_the_configured_tags(tmp_path, tokenizer, image_processor):
    from care_megatron.config import load_config
    from care_megatron.evaluation.benchmark_eval import TrainingBenchmarkSubset

    paths = _fixtures(tmp_path)
    overrides = [f"eval.benchmarks.{k}={v}" for k, v in paths.items()] + ["eval.train_subset=3", "rollout.batch_size=4"]
    sampling = SamplingParams(stop_token_ids=[tokenizer.convert_tokens_to_ids("<|im_end|>")], **SAMPLING)
    reasoning = TrainingBenchmarkSubset.from_config(load_config(None, [*overrides, "data.think_tag=reasoning"]))
    engine = ScriptedEngine(tokenizer, _reasoning_script())
    expected = {"bench/mathvista": 2 / 3, "bench/mmmu_pro_vision": 1 / 3, "bench/macro": 0.5}
    assert reasoning.metrics(engine, tokenizer, image_processor, sampling) == pytest.approx(expected)
    think = TrainingBenchmarkSubset.from_config(load_config(None, overrides))
    assert think.metrics(engine, tokenizer, image_processor, sampling)["bench/macro"] < 0.5
