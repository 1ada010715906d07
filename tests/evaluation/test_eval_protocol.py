"""``eval.protocol``: the paper protocol decodes every example once per seed index at the rollout's sampling
settings, each seed index with its own derived sampling seed; accuracy is the mean over seeds with a Student-t
interval over the per-seed accuracies (closed form here) beside the bootstrap interval; resume skips the
(id, seed) pairs already scored; a folder of the other protocol is refused; the tables name the protocol."""
from __future__ import annotations

import argparse
import json
import math

import pytest
from _benchmark_rows import two_benchmarks

from care_megatron.config import ConfigError, load_config
from care_megatron.evaluation.benchmark_eval import decode_seed, evaluate_benchmarks, protocol_sentence
from care_megatron.evaluation.scoring import EvalReport, combine_seed_reports
from care_megatron.rollout.base import Completion, SamplingParams

T_975_DOF2 = 4.302652729749464  # the 0.975 quantile of Student's t with 2 degrees of freedom
BASE_SEED = 7
SEEDS = 3
N_VISTA, N_VISION = 6, 4
ROLLOUT = dict(temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=16, seed=BASE_SEED)


def _fixtures(tmp_path):
    return two_benchmarks(tmp_path, N_VISTA, N_VISION)


def right(benchmark: str, index: int, k: int) -> bool:
    """Which decodes the engine answers correctly: MathVista pid i at seed index k when i < k + 2 (2, 3, 4 of 6
    right); MMMU-Pro vision v0 at every seed, v1 and v2 at seed 2 only (1, 1, 3 of 4 right)."""
    if benchmark == "mathvista":
        return index < k + 2
    return index == 0 or (k == 2 and index in (1, 2))


class SeedScriptedEngine:
    """Answers each request from the seed index its sampling seed was derived for, recording every call."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []
        self.stop_token_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
        self.index_of = {decode_seed(BASE_SEED, k, call): k for k in range(SEEDS) for call in range(50)}

    def generate(self, requests, sampling):
        self.calls.append({"ids": [r.request_id for r in requests], "seed": sampling.seed,
                           "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k})
        k = self.index_of.get(sampling.seed, 0)  # greedy calls carry the base seed: answered as seed index 0
        out = []
        for r in requests:
            benchmark, _, rid = r.request_id.partition("/")
            index = int(rid.lstrip("v"))
            if benchmark == "mathvista":
                text = f"<think>n</think><answer>{index if right(benchmark, index, k) else index + 1}</answer>"
            else:
                text = "<think>n</think><answer>" + ("(J)" if right(benchmark, index, k) else "A") + "</answer>"
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + self.stop_token_ids
            out.append(Completion(r.request_id, ids, text, [0.0] * len(ids), "stop"))
        return out

    def update_weights(self, named_tensors):
        raise AssertionError("evaluation never updates weights")


def _paper(engine, tokenizer, image_processor, paths, out, seeds=SEEDS, batch_size=4):
    sampling = SamplingParams(stop_token_ids=engine.stop_token_ids, **ROLLOUT)
    return evaluate_benchmarks(engine, tokenizer, image_processor, paths, out, sampling, batch_size=batch_size,
                               model_name="m", progress=False, protocol="paper", seeds=seeds)


def _greedy(engine, tokenizer, image_processor, paths, out):
    sampling = SamplingParams(stop_token_ids=engine.stop_token_ids, **dict(ROLLOUT, temperature=0.0, top_p=1.0, top_k=-1))
    return evaluate_benchmarks(engine, tokenizer, image_processor, paths, out, sampling, batch_size=4,
                               model_name="m", progress=False, protocol="greedy", seeds=SEEDS)


def _closed_form(values):
    """Mean and the 95% t half-width (2 dof) of three values."""
    mean = sum(values) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    return mean, T_975_DOF2 * sd / math.sqrt(3)


def test_paper_protocol_decodes_every_example_once_per_seed_at_the_rollout_settings(tmp_path, tokenizer, image_processor):
    paths = _fixtures(tmp_path)
    engine = SeedScriptedEngine(tokenizer)
    report = _paper(engine, tokenizer, image_processor, paths, tmp_path / "eval")
    # 10 examples x 3 seeds = 30 decodes; a call never mixes seed indices: 10 per seed in calls of 4, 4, 2
    assert [len(c["ids"]) for c in engine.calls] == [4, 4, 2] * SEEDS
    assert all((c["temperature"], c["top_p"], c["top_k"]) == (0.7, 0.9, 5) for c in engine.calls)
    expected_seeds = [decode_seed(BASE_SEED, k, call) for k in range(SEEDS) for call in range(3)]
    assert [c["seed"] for c in engine.calls] == expected_seeds and len(set(expected_seeds)) == 9
    decoded = sorted((i, engine.index_of[c["seed"]]) for c in engine.calls for i in c["ids"])
    every = sorted((f"mathvista/{i}", k) for i in range(N_VISTA) for k in range(SEEDS)) + \
        sorted((f"mmmu_pro_vision/v{i}", k) for i in range(N_VISION) for k in range(SEEDS))
    assert decoded == sorted(every)
    rows = [json.loads(line) for line in (tmp_path / "eval" / "mathvista.jsonl").read_text().splitlines()]
    assert sorted((r["id"], r["seed"]) for r in rows) == sorted(p for p in every if p[0].startswith("mathvista"))
    # MathVista's 6 rows of seed index 1 were decoded in that index's calls 0 (4 rows) and 1 (2 rows)
    assert [r["sampling_seed"] for r in rows if r["seed"] == 1] == [decode_seed(BASE_SEED, 1, 0)] * 4 + \
        [decode_seed(BASE_SEED, 1, 1)] * 2
    decoding = json.loads((tmp_path / "eval" / "decoding.json").read_text())
    assert decoding["protocol"] == "paper" and decoding["seeds"] == decoding["decodes_per_example"] == SEEDS
    assert decoding["decode_seeds"] == [decode_seed(BASE_SEED, k) for k in range(SEEDS)]
    assert decoding["temperature"] == 0.7 and decoding["seed"] == BASE_SEED
    assert report.results["mathvista"].n == N_VISTA  # examples, not decodes


def test_t_interval_over_seeds_is_the_closed_form(tmp_path, tokenizer, image_processor):
    report = _paper(SeedScriptedEngine(tokenizer), tokenizer, image_processor, _fixtures(tmp_path), tmp_path / "eval")
    vista, vision = report.results["mathvista"], report.results["mmmu_pro_vision"]
    assert vista.per_seed == pytest.approx([2 / 6, 3 / 6, 4 / 6])
    assert vision.per_seed == pytest.approx([1 / 4, 1 / 4, 3 / 4])
    for result in (vista, vision):
        mean, half = _closed_form(result.per_seed)
        assert result.accuracy == pytest.approx(mean) and result.t_half_width == pytest.approx(half, rel=1e-9)
        assert (result.t_low, result.t_high) == pytest.approx((mean - half, mean + half), rel=1e-9)
        assert result.ci_low <= mean <= result.ci_high  # the bootstrap over examples, beside it
    # mathvista: 0.5 +- 4.3027 * (1/6) / sqrt(3)
    assert vista.t_half_width == pytest.approx(T_975_DOF2 / 6 / math.sqrt(3), rel=1e-9)
    macro_per_seed = [(2 / 6 + 1 / 4) / 2, (3 / 6 + 1 / 4) / 2, (4 / 6 + 3 / 4) / 2]
    assert report.macro_per_seed == pytest.approx(macro_per_seed)
    mean, half = _closed_form(macro_per_seed)
    assert report.macro_accuracy == pytest.approx(mean) and report.macro_t_half_width == pytest.approx(half, rel=1e-9)
    assert report.macro_t_ci == pytest.approx((mean - half, mean + half), rel=1e-9)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["protocol"] == "paper" and summary["macro_t_half_width"] == pytest.approx(half, rel=1e-9)
    assert summary["results"]["mathvista"]["per_seed"] == pytest.approx([2 / 6, 3 / 6, 4 / 6])

    # the table names the protocol and shows mean +- t half-width [bootstrap interval]
    table = (tmp_path / "eval" / "table.md").read_text()
    assert ("Protocol: paper — temperature 0.7, top-p 0.9, top-k 5, 3 seeds per example; accuracy in percent = "
            "mean over seeds ± the half-width of the 95% Student-t interval over the 3 per-seed accuracies (2 dof)") in table
    ours = next(line for line in table.splitlines() if line.startswith("| ours |"))
    assert ours.startswith(f"| ours | 50.0 ± {100 * vista.t_half_width:.1f} [{100 * vista.ci_low:.1f}, ")
    assert ours.endswith(f"| {100 * mean:.1f} ± {100 * half:.1f} [{100 * report.macro_ci[0]:.1f}, "
                         f"{100 * report.macro_ci[1]:.1f}] (over 2) |")


def test_greedy_protocol_is_one_decode_and_names_itself(tmp_path, tokenizer, image_processor):
    engine = SeedScriptedEngine(tokenizer)
    report = _greedy(engine, tokenizer, image_processor, _fixtures(tmp_path), tmp_path / "eval")
    assert [len(c["ids"]) for c in engine.calls] == [4, 4, 2]  # eval.seeds is not used by greedy
    assert all(c["temperature"] == 0.0 and c["seed"] == BASE_SEED for c in engine.calls)
    assert report.results["mathvista"].accuracy == pytest.approx(2 / 6) and report.results["mathvista"].t_half_width is None
    assert report.macro_t_ci is None and report.macro_per_seed == pytest.approx([(2 / 6 + 1 / 4) / 2])
    table = (tmp_path / "eval" / "table.md").read_text()
    assert "Protocol: greedy — one greedy decode per example" in table and "±" not in table
    decoding = json.loads((tmp_path / "eval" / "decoding.json").read_text())
    assert (decoding["protocol"], decoding["seeds"], decoding["decode_seeds"]) == ("greedy", 1, None)
    rows = [json.loads(line) for line in (tmp_path / "eval" / "mathvista.jsonl").read_text().splitlines()]
    assert {r["seed"] for r in rows} == {0} and "sampling_seed" not in rows[0]


def test_resume_skips_the_id_seed_pairs_already_scored(tmp_path, tokenizer, image_processor):
    paths, out = _fixtures(tmp_path), tmp_path / "eval"
    first = _paper(SeedScriptedEngine(tokenizer), tokenizer, image_processor, paths, out)
    engine = SeedScriptedEngine(tokenizer)
    assert _paper(engine, tokenizer, image_processor, paths, out).macro_accuracy == first.macro_accuracy
    assert engine.calls == []  # everything scored
    # keep seed 0 and the first seed-1 row of MathVista, and cut the next line mid-write
    rows = (out / "mathvista.jsonl").read_text().splitlines()
    kept = [r for r in rows if json.loads(r)["seed"] == 0] + [r for r in rows if json.loads(r)["seed"] == 1][:1]
    cut = [r for r in rows if json.loads(r)["seed"] == 1][1]
    (out / "mathvista.jsonl").write_text("\n".join(kept) + "\n" + cut[:25])
    again = _paper(engine, tokenizer, image_processor, paths, out)
    missing = {(f"mathvista/{i}", 1) for i in range(N_VISTA)} - {(json.loads(kept[-1])["id"], 1)}
    missing |= {(f"mathvista/{i}", 2) for i in range(N_VISTA)}
    decoded = {(i, engine.index_of[c["seed"]]) for c in engine.calls for i in c["ids"]}
    assert decoded == missing and sum(len(c["ids"]) for c in engine.calls) == len(missing) == 11
    assert again.results["mathvista"].per_seed == pytest.approx(first.results["mathvista"].per_seed)
    assert again.macro_accuracy == pytest.approx(first.macro_accuracy)
    calls = len(engine.calls)  # the rows appended after the cut line were kept: nothing is left to decode
    _paper(engine, tokenizer, image_processor, paths, out)
    assert len(engine.calls) == calls


def test_a_folder_of_the_other_protocol_or_seed_count_is_refused(tmp_path, tokenizer, image_processor):
    paths = _fixtures(tmp_path)
    engine = SeedScriptedEngine(tokenizer)
    _greedy(engine, tokenizer, image_processor, paths, tmp_path / "greedy")
    with pytest.raises(ConfigError, match=r"'eval.protocol'.*greedy protocol.*eval.protocol=paper.*another eval.output_dir"):
        _paper(engine, tokenizer, image_processor, paths, tmp_path / "greedy")
    _paper(engine, tokenizer, image_processor, paths, tmp_path / "paper")
    with pytest.raises(ConfigError, match=r"'eval.protocol'.*paper protocol.*another eval.output_dir"):
        _greedy(engine, tokenizer, image_processor, paths, tmp_path / "paper")
    with pytest.raises(ConfigError, match="another eval.output_dir") as caught:
        _paper(engine, tokenizer, image_processor, paths, tmp_path / "paper", seeds=2)
    assert caught.value.field == "eval.output_dir"
    # a decoding.json from before eval.protocol existed is the greedy protocol: a greedy re-run resumes there
    old = tmp_path / "old"
    _greedy(engine, tokenizer, image_processor, paths, old)
    record = json.loads((old / "decoding.json").read_text())
    for key in ("protocol", "seeds", "decode_seeds"):
        del record[key]
    (old / "decoding.json").write_text(json.dumps(record))
    calls = len(engine.calls)
    _greedy(engine, tokenizer, image_processor, paths, old)
    assert len(engine.calls) == calls
    with pytest.raises(ConfigError, match="eval.protocol"):
        _paper(engine, tokenizer, image_processor, paths, old)


def test_protocol_sentences():
    assert protocol_sentence({"protocol": "greedy"}).startswith("Protocol: greedy — one greedy decode per example")
    paper = {"protocol": "paper", "temperature": 1.0, "top_p": 1.0, "top_k": -1, "seeds": 5}
    assert protocol_sentence(paper).startswith("Protocol: paper — temperature 1.0, top-p 1.0, 5 seeds per example; "
                                               "accuracy in percent = mean over seeds ± the half-width of the 95% "
                                               "Student-t interval over the 5 per-seed accuracies (4 dof)")
    assert protocol_sentence(paper, intervals=False) == \
        "Protocol: paper — temperature 1.0, top-p 1.0, 5 seeds per example; accuracy = mean over seeds."
    assert "no t-interval with one seed" in protocol_sentence(dict(paper, seeds=1))


def test_decode_seeds_are_deterministic_and_distinct():
    assert decode_seed(0, 1) == decode_seed(0, 1) and decode_seed(0, 1, 2) == decode_seed(0, 1, 2)
    seeds = {decode_seed(base, k, call) for base in range(3) for k in range(5) for call in range(20)}
    assert len(seeds) == 3 * 5 * 20 and all(0 <= s < 2 ** 31 for s in seeds)
    assert decode_seed(0, 0) != decode_seed(1, 0) and decode_seed(0, 0) != decode_seed(0, 0, 0)


def test_eval_protocol_config_and_cli_flags(capsys):
    from care_megatron.cli import _eval_flags, main
    from care_megatron.evaluation.run import _protocol_sampling

    config = load_config(None, [])
    assert (config.eval.protocol, config.eval.seeds) == ("greedy", 5)
    with pytest.raises(ConfigError, match="'eval.protocol': must be greedy or paper"):
        load_config(None, ["eval.protocol=best_of_n"])
    with pytest.raises(ConfigError, match="'eval.seeds'"):
        load_config(None, ["eval.seeds=0"])
    flagged = _eval_flags(argparse.Namespace(protocol="paper", seeds="3"), config)
    assert (flagged.eval.protocol, flagged.eval.seeds) == ("paper", 3)
    assert _eval_flags(argparse.Namespace(protocol=None, seeds=None), config) is config
    assert main("eval", ["--protocol", "sampled"]) == 2
    assert "config field 'eval.protocol'" in capsys.readouterr().err
    assert main("eval", ["--protocol", "paper", "--seeds", "0"]) == 2
    assert "config field 'eval.seeds'" in capsys.readouterr().err

    # the decoding of each protocol: greedy, or the rollout's temperature / top-p / top-k with train.seed
    rollout = load_config(None, ["rollout.temperature=0.7", "rollout.top_p=0.9", "rollout.top_k=5", "train.seed=3",
                                 "eval.protocol=paper"])
    paper = _protocol_sampling(rollout, [9], 16, paper=True)
    assert (paper.temperature, paper.top_p, paper.top_k, paper.seed, paper.max_new_tokens) == (0.7, 0.9, 5, 3, 16)
    greedy = _protocol_sampling(rollout, [9], 16, paper=False)
    assert (greedy.temperature, greedy.top_p, greedy.top_k) == (0.0, 1.0, -1)


def test_held_out_reports_of_the_seeds_combine_to_their_means():
    def report(accuracy, macro, fmt, think, per_source_accuracy):
        return EvalReport(accuracy=accuracy, format_rate=fmt, macro_accuracy=macro, num_examples=4, think_length=think,
                          per_source={"a": {"n": 4, "accuracy": per_source_accuracy, "format": fmt, "think_length": think}},
                          samples=[{"accuracy": accuracy}])

    combined = combine_seed_reports([report(0.25, 0.2, 1.0, 10.0, 0.25), report(0.5, 0.4, 0.5, 20.0, 0.5),
                                     report(0.75, 0.6, 0.0, 30.0, 0.75)])
    assert (combined.accuracy, combined.macro_accuracy, combined.format_rate, combined.think_length) == \
        pytest.approx((0.5, 0.4, 0.5, 20.0))
    assert combined.per_source["a"] == pytest.approx({"n": 4, "accuracy": 0.5, "format": 0.5, "think_length": 20.0})
    assert combined.protocol == "paper" and combined.per_seed_accuracy == [0.25, 0.5, 0.75]
    assert combined.samples == [{"accuracy": 0.25}] and combined.num_examples == 4
    half = T_975_DOF2 * 0.25 / math.sqrt(3)  # per-seed accuracies 0.25, 0.5, 0.75: sd 0.25
    assert f"accuracy 0.500 ± {half:.3f}" in combined.to_table()


@pytest.mark.slow
def test_care_eval_paper_protocol_on_the_tiny_model(tmp_path, capsys):
    """``care-eval --benchmarks ... --protocol paper --seeds 2`` end to end with the tiny random policy: every
    example decoded once per seed at the rollout's temperature, a re-run resumes, greedy there is refused."""
    from care_megatron.cli import main

    paths = _fixtures(tmp_path)
    out = tmp_path / "eval"
    argv = ["--benchmarks", ",".join(f"{k}={v}" for k, v in paths.items()), "--no-progress", "--protocol", "paper",
            "--seeds", "2", f"train.output_dir={tmp_path}", f"eval.output_dir={out}", "rollout.max_new_tokens=4",
            "rollout.batch_size=8", "rollout.temperature=0.8", "eval.limit=3"]
    assert main("eval", argv) == 0
    assert "Protocol: paper — temperature 0.8, top-p 1.0, 2 seeds per example" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["decoding"]["temperature"] == 0.8 and summary["decoding"]["seeds"] == 2
    assert {k: (v["n"], len(v["per_seed"])) for k, v in summary["results"].items()} == \
        {"mathvista": (3, 2), "mmmu_pro_vision": (3, 2)}
    rows = [json.loads(line) for line in (out / "mathvista.jsonl").read_text().splitlines()]
    assert sorted((r["id"], r["seed"]) for r in rows) == sorted((f"mathvista/{i}", k) for i in range(3) for k in range(2))
    assert main("eval", argv) == 0  # resumed: nothing left
    assert len((out / "mathvista.jsonl").read_text().splitlines()) == 6
    greedy = [a for a in argv if a not in ("--protocol", "paper", "--seeds", "2")]
    assert main("eval", greedy) == 2
    assert "config field 'eval.protocol'" in capsys.readouterr().err
