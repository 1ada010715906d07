"""Source loaders read tiny copies of each release's layout built here, skipping and counting bad rows."""
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from care_megatron.data.schema import RecordError, check_image
from care_megatron.data.sources import (
    ColumnMapping,
    get_loader,
    load_chartqa,
    load_easy_vqa,
    load_geometry3k,
    load_jsonl_mapped,
    load_parquet,
    load_sharegpt,
    load_virl39k,
    parse_inline_choices,
    split_reasoning,
    strip_boxed,
)
from _data_fixtures import chart_image, make_chartqa, make_geometry3k, make_virl39k, png_bytes


def test_chartqa_layout(tmp_path):
    records, report = load_chartqa(make_chartqa(tmp_path / "ChartQA"), "train")
    assert [r.question for r in records] == ["What is the value of bar 0?", "What is the value of bar 1?",
                                             "What is the value of bar 2?", "Which year is highest 0?",
                                             "Which year is highest 1?"]
    assert [(r.answer, r.answer_type) for r in records[:3]] == [("12", "integer"), ("3.5", "float"), ("Yes", "text")]
    assert records[0].metadata == {"split": "train", "subset": "human", "imgname": "h0.png"}
    assert records[3].metadata["subset"] == "augmented"
    assert all(r.source == "chartqa" and len(r.images) == 1 for r in records)
    assert dict(report.skipped) == {"missing_field": 1, "unreadable_image": 1}
    assert report.loaded == 5
    with pytest.raises(FileNotFoundError):
        load_chartqa(tmp_path / "ChartQA", "val")


def test_geometry3k_layout(tmp_path):
    records, report = load_geometry3k(make_geometry3k(tmp_path / "geometry3k"), "train")
    assert [r.id for r in records] == ["geometry3k/train/0", "geometry3k/train/1"]
    first = records[0]
    assert first.answer == "B" and first.answer_type == "multiple_choice" and first.choices == ["3", "7", "9.5", "12"]
    assert first.question == "Find x in triangle 0. Options: A. 3, B. 7, C. 9.5, D. 12"
    assert first.metadata["choices_in_question"] is True and first.metadata["problem_type_goal"] == ["Length"]
    assert first.images[0].endswith("0/img_diagram.png")
    assert dict(report.skipped) == {"unreadable_image": 1, "missing_file": 1}


def test_virl39k_parquet_with_embedded_images(tmp_path):
    records, report = load_virl39k(make_virl39k(tmp_path / "ViRL39K" / "39Krelease.parquet"))
    assert [r.id for r in records] == ["virl39k/q0", "virl39k/q1", "virl39k/q2"]
    area, choice, latex = records
    assert area.question == "What is the area?" and area.answer == "17" and area.answer_type == "integer"
    assert isinstance(area.images[0], bytes) and Image.open(io.BytesIO(area.images[0])).size == (80, 60)
    assert area.metadata == {"category": "geometry", "origin": "MMK12", "PassRate_32BTrained": 0.5, "PassRate_7BBase": 0.25}
    assert choice.answer == "B" and choice.answer_type == "multiple_choice"
    assert choice.choices == ["3", "\\frac{1}{2}", "9"] and choice.metadata["choices_in_question"] is True
    assert latex.answer == "\\frac{\\sqrt{3}}{2}" and latex.answer_type == "latex"
    assert latex.images == [str(tmp_path / "ViRL39K" / "images" / "on_disk.png")]
    check_image(latex.images[0])
    assert dict(report.skipped) == {"empty_answer": 1}
    limited, _ = load_virl39k(tmp_path / "ViRL39K", limit=1)  # a folder of parquet files works too
    assert [r.id for r in limited] == ["virl39k/q0"]


def test_generic_parquet_and_jsonl_with_column_mapping(tmp_path):
    rows = [{"uid": "a", "problem": "<image>How many?", "solution": "4", "img": {"bytes": png_bytes(chart_image(1)), "path": None},
             "why": "count: 4"},
            {"uid": "b", "problem": "Missing solution", "solution": None, "img": None, "why": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    mapping = ColumnMapping(question="problem", answer="solution", images="img", id="uid", rationale="why")
    records, report = load_parquet(tmp_path / "t.parquet", mapping, source="mine")
    assert len(records) == 1 and records[0].id == "mine/a" and records[0].question == "How many?"
    assert records[0].answer_type == "integer" and records[0].rationale == "count: 4" and len(records[0].images) == 1
    assert dict(report.skipped) == {"missing_field": 1}

    chart_image(2).save(tmp_path / "p.png")
    lines = [json.dumps({"q": "Which?", "a": "B", "opts": ["x", "y"], "pics": ["p.png"]}),
             json.dumps({"q": "Bad letter", "a": "D", "opts": ["x", "y"], "pics": ["p.png"], "t": "multiple_choice"}),
             json.dumps({"q": "Gone", "a": "1", "pics": ["gone.png"]}), "[1, 2]"]
    (tmp_path / "t.jsonl").write_text("\n".join(lines))
    mapping = ColumnMapping(question="q", answer="a", images="pics", choices="opts", answer_type="t")
    records, report = load_jsonl_mapped(tmp_path / "t.jsonl", mapping, source="js")
    assert [(r.answer, r.answer_type, r.choices) for r in records] == [("B", "multiple_choice", ["x", "y"])]
    assert records[0].images == [str(tmp_path / "p.png")]
    assert dict(report.skipped) == {"bad_choices": 1, "unreadable_image": 1, "invalid_json": 1}


def test_easy_vqa_source():
    import easy_vqa

    records, report = load_easy_vqa("test", limit=50)
    texts, answers, _ = easy_vqa.get_test_questions()
    assert len(records) == 50 and report.loaded == 50
    assert [r.answer for r in records] == answers[:50]
    assert [r.question.lower() for r in records] == [t.lower() for t in texts[:50]]
    assert set(r.answer for r in records) <= set(easy_vqa.get_answers())
    for record in records[:5]:
        check_image(record.images[0])
    with pytest.raises(ValueError, match="split"):
        load_easy_vqa("val")


def test_helpers():
    assert strip_boxed("so \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert strip_boxed("\\boxed{1} then \\boxed{2}") == "2"
    assert strip_boxed(" 42 ") == "42"
    assert parse_inline_choices("Q?\nA. one\nB: two\n(C) three") == ["one", "two", "three"]
    assert parse_inline_choices("Q?\nB. skipped A") is None
    assert get_loader("chartqa") is load_chartqa
    with pytest.raises(ValueError, match="valid"):
        get_loader("coco")


def test_easy_vqa_records_carry_a_cold_start_rationale_that_scores_full_marks():
    from care_megatron.data.sources import easy_vqa_rationale, load_easy_vqa
    from care_megatron.rewards.verifier import score

    records, _ = load_easy_vqa("train", limit=60)
    kinds = {r.rationale.split(":")[0] for r in records}
    assert kinds <= {"shape", "colour", "check"} and len(kinds) >= 2
    for r in records:
        assert r.rationale == easy_vqa_rationale(r.answer) and r.rationale.endswith(r.answer)
        verdict = score(f"<think>{r.rationale}</think><answer>{r.answer}</answer>", r.answer, r.answer_type)
        assert verdict.accuracy == 1.0 and verdict.format == 1.0


# ------------------------------------------------------------------- LLaVA / ShareGPT conversations
def _vision_r1_cold(tmp_path):
    """A folder in Vision-R1-cold's layout: a LLaVA-CoT style file (from/value, human/gpt, one ``image``
    path) and a Mulberry style file (from/value, user/assistant, an ``images`` list), images under their
    own folders, LLaMA-Factory's dataset_info.json beside them; plus malformed rows of every kind."""
    root = tmp_path / "vision_r1_cold"
    (root / "llava_cot_images" / "coco").mkdir(parents=True)
    (root / "mulberry_images" / "chartqa").mkdir(parents=True)
    (root / "llava_cot_images" / "coco" / "a.png").write_bytes(png_bytes(Image.new("RGB", (40, 30), "red")))
    (root / "mulberry_images" / "chartqa" / "b.png").write_bytes(png_bytes(Image.new("RGB", (30, 40), "blue")))
    (root / "dataset_info.json").write_text(json.dumps({"vision_r1_llava_cot_full": {"formatting": "sharegpt"}}))
    think = "<think>\nThe chart shows three bars.\nWait, recount: the third is hidden. So 4.\n</think>"
    llava = [
        {"id": "cot-0", "image": "llava_cot_images/coco/a.png", "conversations": [
            {"from": "human", "value": "<image>\nHow many bars are there?"},
            {"from": "gpt", "value": think + "\n\n<answer>\\boxed{4}</answer>"}]},
        {"id": "cot-1", "image": "llava_cot_images/coco/a.png", "conversations": [  # answer after </think>
            {"from": "system", "value": "You are helpful."},
            {"from": "human", "value": "<image>Which option?\nA. red\nB. blue"},
            {"from": "gpt", "value": "<think>It is red.</think>\nThe answer is \\boxed{A}"}]},
        {"id": "bad-0", "image": "llava_cot_images/coco/a.png"},                               # no conversations
        {"id": "bad-1", "image": "llava_cot_images/coco/a.png", "conversations": [          # no assistant turn
            {"from": "human", "value": "<image>Q?"}]},
        {"id": "bad-2", "image": "llava_cot_images/coco/a.png", "conversations": [          # truncated reasoning
            {"from": "human", "value": "<image>Q?"}, {"from": "gpt", "value": "<think>long and unfinished"}]},
        {"id": "bad-3", "image": "llava_cot_images/coco/missing.png", "conversations": [    # image not there
            {"from": "human", "value": "<image>Q?"}, {"from": "gpt", "value": "<think>r</think><answer>1</answer>"}]},
        {"id": "bad-4", "image": "llava_cot_images/coco/a.png", "conversations": [          # empty answer
            {"from": "human", "value": "<image>Q?"}, {"from": "gpt", "value": "<think>r</think><answer> </answer>"}]},
        ["not", "an", "object"],
        {"id": "bad-5", "image": "llava_cot_images/coco/a.png", "conversations": [          # message not a dict
            "human: Q?", {"from": "gpt", "value": "1"}]},
    ]
    (root / "vision_r1_llava_cot_full.json").write_text(json.dumps(llava))
    mulberry = [
        {"images": ["mulberry_images/chartqa/b.png"], "conversations": [
            {"from": "user", "value": "<image>What is 1/2 + 1/4?"},
            {"from": "assistant", "value": "<think>1/2 = 2/4, so 3/4.</think><answer>\\frac{3}{4}</answer>"}]},
    ]
    (root / "vision_r1_mulberry_sft_full.json").write_text(json.dumps(mulberry))
    return root


def test_sharegpt_vision_r1_cold_layout_maps_reasoning_to_rationale(tmp_path):
    root = _vision_r1_cold(tmp_path)
    records, report = load_sharegpt(root)
    assert [r.id for r in records] == ["vision_r1_llava_cot_full/cot-0", "vision_r1_llava_cot_full/cot-1",
                                       "vision_r1_mulberry_sft_full/0"]
    first, second, third = records
    assert first.question == "How many bars are there?" and first.answer == "4" and first.answer_type == "integer"
    assert first.rationale == "The chart shows three bars.\nWait, recount: the third is hidden. So 4."
    assert first.images == [str(root / "llava_cot_images" / "coco" / "a.png")]
    assert first.source == "vision_r1_llava_cot_full" and first.metadata == {"turns": 2}
    assert (second.answer, second.answer_type, second.choices) == ("A", "multiple_choice", ["red", "blue"])
    assert second.rationale == "It is red." and second.metadata["turns"] == 3
    assert (third.answer, third.rationale) == ("\\frac{3}{4}", "1/2 = 2/4, so 3/4.")
    assert third.images == [str(root / "mulberry_images" / "chartqa" / "b.png")]
    assert dict(report.skipped) == {"bad_conversation": 4, "unclosed_think": 1, "unreadable_image": 1,
                                    "empty_answer": 1}
    assert report.loaded == 3 and get_loader("sharegpt") is load_sharegpt
    assert load_sharegpt(root, limit=1)[0] == records[:1]


def test_sharegpt_jsonl_and_parquet_with_role_content_messages(tmp_path):
    image = png_bytes(Image.new("RGB", (32, 32), "green"))
    rows = [{"messages": [{"role": "user", "content": "<image>Colour?"},
                          {"role": "assistant", "content": "<think>It looks green.</think><answer>green</answer>"}],
             "images": [{"bytes": image, "path": None}]},
            {"messages": [{"role": "user", "content": "No reasoning here?"}, {"role": "assistant", "content": "yes"}],
             "images": []}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "cold.parquet")
    records, report = load_sharegpt(tmp_path / "cold.parquet", source="cold")
    assert [(r.id, r.answer, r.rationale) for r in records] == [("cold/cold/0", "green", "It looks green."),
                                                                 ("cold/cold/1", "yes", None)]
    assert records[0].images == [image] and report.num_skipped == 0
    lines = [json.dumps({"id": 7, "conversations": [{"from": "human", "value": "2+2?"},
                                                    {"from": "gpt", "value": "2+2 is \\boxed{4}"}]}),
             "{not json", ""]
    (tmp_path / "cold.jsonl").write_text("\n".join(lines))
    records, report = load_sharegpt(tmp_path / "cold.jsonl")
    assert [(r.id, r.answer, r.rationale) for r in records] == [("cold/7", "4", "2+2 is \\boxed{4}")]
    assert dict(report.skipped) == {"invalid_json": 1}
    (tmp_path / "object.json").write_text(json.dumps({"conversations": []}))
    with pytest.raises(ValueError, match="JSON list"):
        load_sharegpt(tmp_path / "object.json")
    with pytest.raises(FileNotFoundError):
        load_sharegpt(tmp_path / "absent.json")


def test_split_reasoning_cases():
    assert split_reasoning("<think> a </think><answer> b </answer>") == ("a", "b")
    assert split_reasoning("a </think> b") == ("a", "b")              # template opened <think> itself
    assert split_reasoning("so \\boxed{3}") == ("so \\boxed{3}", "so \\boxed{3}")
    assert split_reasoning("plain") == (None, "plain")
    assert split_reasoning("<think>  </think><answer>x</answer>") == (None, "x")
    with pytest.raises(RecordError, match="think"):
        split_reasoning("<think>unfinished")


def test_sft_tasks_config_reads_the_conversations(tmp_path):
    """data.sft_tasks selects the cold-start data; rows without reasoning are counted, not trained on."""
    from care_megatron.config import load_config
    from care_megatron.data.dataset import build_records, build_sft_records

    root = _vision_r1_cold(tmp_path)
    config = load_config(None, [f"data.sft_tasks=[sharegpt:{root}]", "data.tasks=[count_shapes]",
                                "data.train_size=4", "data.eval_size=2"])
    records, reports = build_sft_records(config.data)
    assert sorted(r.id for r in records) == ["vision_r1_llava_cot_full/cot-0", "vision_r1_llava_cot_full/cot-1",
                                             "vision_r1_mulberry_sft_full/0"]
    assert sum(r.num_skipped for r in reports) == 7
    default = build_sft_records(load_config(None, ["data.tasks=[count_shapes]", "data.train_size=4",
                                                   "data.eval_size=2"]).data)[0]
    assert len(default) == 4 and all(r.source == "count_shapes" and r.rationale for r in default)
    # the same files as an RL task: split into training and held-out records like jsonl:
    splits = build_records(load_config(None, [f"data.tasks=[sharegpt:{root}]", "data.train_size=2",
                                              "data.eval_size=1"]).data)
    assert len(splits.train) == 2 and len(splits.eval) == 1
    assert not {r.id for r in splits.train} & {r.id for r in splits.eval}


# the hardware of a cluster SFT recipe, swapped for the tiny CPU model; everything else stays the recipe's
TINY_HARDWARE = ["model.name={tiny}", "model.tokenizer=tiny", "model.dtype=float32", "parallel.backend=torch",
                 "parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=false", "rollout.engine=hf",
                 "rollout.tensor_parallel_size=1", "data.image_backend=pil", "data.min_pixels=3136",
                 "data.max_pixels=3136", "train.threads=1", "train.sft_batch_size=2", "train.sft_steps=2"]


@pytest.mark.parametrize("model,tiny", [("qwen2_5_vl_3b", "tiny_qwen2_5_vl"), ("qwen3_vl_8b", "tiny_qwen3_vl")])
def test_care_sft_runs_the_sft_recipe_on_vision_r1_cold_conversations(tmp_path, model, tiny):
    """``care-sft --config recipes/<model>-sft.yaml`` (hardware swapped for the tiny CPU model, the data path
    for a Vision-R1-cold-layout folder) trains 2 steps on the conversations and writes the policy where
    the model's RL recipes start from (``sft_output_dir``: ``<train.output_dir>/sft``)."""
    import math

    from care_megatron.cli import main
    from care_megatron.config import load_config
    from care_megatron.metrics import read_metrics
    from care_megatron.sft import sft_output_dir

    root = _vision_r1_cold(tmp_path)
    recipe = Path(__file__).resolve().parents[2] / "examples" / "configs" / "recipes" / f"{model}-sft.yaml"
    overrides = [o.format(tiny=tiny) for o in TINY_HARDWARE] + [
        f"data.sft_tasks=[sharegpt:{root}]", f"train.output_dir={tmp_path / 'run'}"]
    assert main("sft", ["--config", str(recipe), "--no-progress", *overrides]) == 0
    config = load_config(recipe, overrides)
    out = sft_output_dir(config)
    assert out == tmp_path / "run" / "sft"
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]  # finished-step count, as RL logs it
    assert all(math.isfinite(r["loss"]) and r["skipped"] == 0 and r["sft/skipped_too_long"] == 0 for r in rows)
    assert all(r["lr"] == pytest.approx(5e-6 * min(1, (i + 1) / 625)) for i, r in enumerate(rows))  # recipe's warm-up
    assert (out / "config.json").exists() and (out / "tokenizer_config.json").exists()


def test_care_sft_leaves_out_conversations_longer_than_a_micro_batch(tmp_path):
    """A conversation longer than ``train.micro_batch_tokens`` is left out of its step and counted
    (``sft/skipped_too_long``) instead of ending the run; a step left with none is logged as skipped."""
    from care_megatron.cli import main
    from care_megatron.config import load_config
    from care_megatron.data.dataset import PromptIterator, build_sft_records
    from care_megatron.data.prompting import resolve_system_prompt
    from care_megatron.metrics import read_metrics
    from care_megatron.models import build_model_and_processor
    from care_megatron.sft import sft_output_dir, sft_sequence

    root = _vision_r1_cold(tmp_path)
    overrides = [f"data.sft_tasks=[sharegpt:{root}]", "data.tasks=[count_shapes]", "data.train_size=4",
                 "data.eval_size=2", "train.sft_steps=4", "train.sft_batch_size=2", "train.threads=1",
                 f"train.output_dir={tmp_path / 'run'}"]
    config = load_config(None, overrides)
    records, _ = build_sft_records(config.data)
    _, tokenizer, processor = build_model_and_processor(config.model, min_pixels=config.data.min_pixels,
                                                        max_pixels=config.data.max_pixels)
    system = resolve_system_prompt(config.data.system_prompt)
    lengths = {r.id: len(sft_sequence(r, tokenizer, processor, i, None, system)) for i, r in enumerate(records)}
    budget = min(lengths.values())  # only the shortest of the three conversations fits
    assert sorted(lengths.values())[1] > budget
    batches = PromptIterator(records, 2, seed=config.train.seed)
    expected = [sum(lengths[r.id] > budget for r in next(batches)) for _ in range(4)]
    assert 2 in expected and 1 in expected  # seed 0 draws both: a step with one left, a step with none
    assert main("sft", ["--no-progress", *overrides, f"train.micro_batch_tokens={budget}"]) == 0
    rows = read_metrics(sft_output_dir(config) / "metrics.jsonl")
    assert [r["sft/skipped_too_long"] for r in rows] == expected
    assert [r["skipped"] for r in rows] == [int(n == 2) for n in expected]
    assert all(("loss" in r) == (n < 2) for r, n in zip(rows, expected))
