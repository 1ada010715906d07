"""Source loaders read tiny copies of each release's layout built here, skipping and counting bad rows."""
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from care_megatron.data.schema import check_image
from care_megatron.data.sources import (
    ColumnMapping,
    get_loader,
    load_chartqa,
    load_easy_vqa,
    load_geometry3k,
    load_jsonl_mapped,
    load_parquet,
    load_virl39k,
    parse_inline_choices,
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
