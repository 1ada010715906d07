"""Loading the paper's six benchmarks from parquet files written here in each release's schema and layout."""
from __future__ import annotations

import pytest
from _benchmark_rows import (
    MATHVERSE, MATHVISION, MATHVISTA, MMMU, MMMU_PRO_STANDARD, MMMU_PRO_VISION, cell, png, write,
)

from care_megatron.evaluation.benchmarks import (
    BENCHMARKS, MMMU_PRO_VISION_QUESTION, VISION_ONLY_QUESTION, benchmark_prompt, load_benchmark,
    load_benchmark_with_report,
)

RED, GREEN, BLUE, GREY = png((255, 0, 0)), png((0, 255, 0)), png((0, 0, 255)), png((128, 128, 128))


def test_registry_names_exactly_the_six_benchmarks():
    assert set(BENCHMARKS) == {"mathvista", "mathverse", "mathvision", "mmmu", "mmmu_pro_standard", "mmmu_pro_vision"}


def _mathvista_rows():
    base = {"image": "images/1.jpg", "unit": None, "metadata": {"category": "math-targeted-vqa", "source": "x"}}
    return [
        dict(base, pid="1", question="Which is largest?", decoded_image=cell(RED, "images/1.jpg"),
             choices=["3", "5", "7"], precision=None, answer="7", question_type="multi_choice", answer_type="text",
             query="Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.\n"
                   "Question: Which is largest?\nChoices:\n(A) 3\n(B) 5\n(C) 7"),
        dict(base, pid="2", question="How long is the bar?", decoded_image=cell(GREEN), choices=None, precision=1.0,
             answer="1.5", question_type="free_form", answer_type="float", unit="cm",
             query="Hint: ... requiring a floating-point number with one decimal place ...\nQuestion: How long?"),
        dict(base, pid="3", question="What is the ratio?", decoded_image=cell(BLUE), choices=None, precision=2.0,
             answer="0.33", question_type="free_form", answer_type="float", query=""),
        dict(base, pid="4", question="How many?", decoded_image=cell(RED), choices=None, precision=None, answer="12",
             question_type="free_form", answer_type="integer", query=""),
        # malformed: the key is not one of the choices; a missing question; an image that does not decode
        dict(base, pid="5", question="Pick", decoded_image=cell(RED), choices=["a", "b"], precision=None, answer="c",
             question_type="multi_choice", answer_type="text", query=""),
        dict(base, pid="6", question=None, decoded_image=cell(RED), choices=None, precision=None, answer="1",
             question_type="free_form", answer_type="integer", query=""),
        dict(base, pid="7", question="Broken", decoded_image=cell(b"not an image"), choices=None, precision=None,
             answer="1", question_type="free_form", answer_type="integer", query=""),
    ]


def test_mathvista_testmini_only_letters_precision_and_malformed_rows(tmp_path):
    root = tmp_path / "MathVista"
    write(root / "data" / "testmini-00000-of-00001.parquet", _mathvista_rows(), MATHVISTA)
    write(root / "data" / "test-00000-of-00002.parquet", [dict(_mathvista_rows()[3], pid="test-only")], MATHVISTA)
    records, report = load_benchmark_with_report("mathvista", str(root))
    assert [r.id for r in records] == ["mathvista/1", "mathvista/2", "mathvista/3", "mathvista/4"]
    assert report.loaded == 4 and dict(report.skipped) == {"bad_choices": 1, "missing_field": 1, "unreadable_image": 1}
    mc, f1, f2, integer = records
    assert (mc.answer, mc.answer_type, mc.choices) == ("C", "multiple_choice", ["3", "5", "7"])
    assert mc.metadata["answer_text"] == "7" and mc.images == [RED]
    assert mc.metadata["hint"].startswith("Hint: Please answer")
    assert (f1.answer_type, f1.metadata["precision"], f1.metadata["unit"], f1.metadata["answer_type"]) == ("float", 1.0, "cm", "float")
    assert (f2.metadata["precision"], integer.metadata["precision"], integer.answer_type) == (2.0, None, "integer")
    prompt = benchmark_prompt(mc)
    assert prompt.index("Hint:") < prompt.index("Which is largest?") < prompt.index("(C) 7")
    # a single parquet file is accepted as well; limit keeps the first usable rows
    assert [r.id for r in load_benchmark("mathvista", str(root / "data" / "testmini-00000-of-00001.parquet"), limit=2)] == \
        ["mathvista/1", "mathvista/2"]


def test_mathvista_image_path_without_bytes_resolves_against_the_dataset(tmp_path):
    root = tmp_path / "MathVista"
    (root / "images").mkdir(parents=True)
    (root / "images" / "1.png").write_bytes(GREEN)
    row = dict(_mathvista_rows()[3], decoded_image=None, image="images/1.png")
    write(root / "data" / "testmini-00000-of-00001.parquet", [row], MATHVISTA)
    (record,) = load_benchmark("mathvista", str(root))
    assert record.images == [str(root / "images" / "1.png")]


def test_mathverse_reads_testmini_parquet_not_text_only(tmp_path):
    root = tmp_path / "MathVerse"
    meta = {"split": "testmini", "source": "GeoQA", "subject": "Plane Geometry", "subfield": "Angle"}
    mc_text = "As shown in the figure, find the angle.\nChoices:\nA:40°\nB:50°\nC:60°\nD:70°"
    rows = [
        dict(sample_index="1", problem_index="1", problem_version="Text Lite", question=mc_text, image=cell(RED),
             answer="B", question_type="multi-choice", metadata=meta, query_wo="", query_cot="", question_for_eval=mc_text),
        dict(sample_index="2", problem_index="1", problem_version="Vision Only", question="", image=cell(BLUE),
             answer="B", question_type="multi-choice", metadata=meta, query_wo="", query_cot="", question_for_eval=mc_text),
        dict(sample_index="3", problem_index="2", problem_version="Text Dominant", question="Find x.", image=cell(GREEN),
             answer="2\\sqrt{3}", question_type="free-form", metadata=meta, query_wo="", query_cot="",
             question_for_eval="Find x."),
    ]
    write(root / "testmini.parquet", rows, MATHVERSE)
    write(root / "testmini_text_only.parquet", [dict(rows[2], sample_index="text-only")], MATHVERSE)
    mc, vision_only, free = load_benchmark("mathverse", str(root))
    assert (mc.answer, mc.choices) == ("B", ["40°", "50°", "60°", "70°"])
    assert benchmark_prompt(mc).count("A:40°") == 1  # the options are in the question; not repeated
    assert vision_only.question == VISION_ONLY_QUESTION and vision_only.choices == ["40°", "50°", "60°", "70°"]
    assert (free.answer, free.answer_type) == ("2\\sqrt{3}", "latex")
    assert free.id == "mathverse/3"


def test_mathvision_full_test_split_strips_image_tags(tmp_path):
    root = tmp_path / "MATH-Vision"
    rows = [
        dict(id="1", question="<image1>\nWhich figure is shaded?", options=["A", "B", "C", "D", "E"], image="images/1.jpg",
             decoded_image=cell(RED), answer="C", solution=None, level=2, subject="metric geometry - area"),
        dict(id="2", question="How many edges does the cube <image1> have?", options=[], image="images/2.jpg",
             decoded_image=cell(BLUE), answer="12", solution=None, level=1, subject="solid geometry"),
        dict(id="3", question="<image1> Which?", options=["x", "y"], image="images/3.jpg",
             decoded_image=cell(BLUE), answer="Q", solution=None, level=1, subject="logic"),
    ]
    write(root / "data" / "test-00000-of-00001-3532b8d3f1b4047a.parquet", rows, MATHVISION)
    write(root / "data" / "testmini-00000-of-00001-f8ff70fcb2f29b1d.parquet", [dict(rows[1], id="mini")], MATHVISION)
    records, report = load_benchmark_with_report("mathvision", str(root))
    mc, free = records
    assert dict(report.skipped) == {"bad_choices": 1}
    assert "<image" not in mc.question and mc.question == "Which figure is shaded?"
    assert (mc.answer, mc.answer_type, len(mc.choices)) == ("C", "multiple_choice", 5)
    assert free.question == "How many edges does the cube have?" and (free.answer, free.answer_type) == ("12", "integer")


def _mmmu_row(**kw):
    row = {"id": "validation_Physics_1", "explanation": "", "img_type": "['Diagrams']", "topic_difficulty": "Medium",
           "question_type": "multiple-choice", "subfield": "Mechanics"}
    row.update(kw)
    return row


def test_mmmu_options_literal_multi_image_placeholders_and_dev_split_ignored(tmp_path):
    root = tmp_path / "MMMU"
    # str(list) of options holding apostrophes: Python quotes them with ", which json.loads cannot read
    options = repr(["Newton's first law", "Hooke's law", "<image 3>", "none"])
    rows = [
        _mmmu_row(id="validation_Physics_1", question="<image 2> and <image 1>: which law applies? See <image 2> again.",
                  options=options, image_1=cell(RED), image_2=cell(GREEN), image_3=cell(BLUE), answer="B"),
        _mmmu_row(id="validation_Physics_2", question="<image 1> What is the speed in m/s?", options="[]",
                  image_1=cell(GREY), answer="3.5", question_type="open"),
        _mmmu_row(id="validation_Physics_3", question="<image 4> refers to a missing image", options=repr(["a", "b"]),
                  image_1=cell(RED), answer="A"),
        _mmmu_row(id="validation_Physics_4", question="<image 1> ?", options="['unterminated", image_1=cell(RED), answer="A"),
    ]
    write(root / "Physics" / "validation-00000-of-00001.parquet", rows, MMMU)
    write(root / "Physics" / "dev-00000-of-00001.parquet", [dict(rows[1], id="dev_Physics_1")], MMMU)
    write(root / "Physics" / "test-00000-of-00001.parquet", [dict(rows[1], id="test_Physics_1", answer="?")], MMMU)
    records, report = load_benchmark_with_report("mmmu", str(root))
    assert [r.id for r in records] == ["mmmu/validation_Physics_1", "mmmu/validation_Physics_2"]
    assert dict(report.skipped) == {"missing_image": 1, "malformed_row": 1}
    multi, open_ = records
    assert multi.images == [GREEN, RED, BLUE]  # first-appearance order: question, then options; each once
    assert multi.question == "[image 1] and [image 2]: which law applies? See [image 1] again."
    assert multi.choices == ["Newton's first law", "Hooke's law", "[image 3]", "none"]
    assert (multi.answer, multi.answer_type, multi.metadata["subject"]) == ("B", "multiple_choice", "Physics")
    assert all("<image" not in text for text in [multi.question, *multi.choices, benchmark_prompt(multi)])
    assert (open_.answer, open_.answer_type, open_.images) == ("3.5", "text", [GREY])


def test_mmmu_pro_standard_ten_options_and_vision_rows(tmp_path):
    root = tmp_path / "MMMU_Pro"
    ten = [f"option {k}" for k in range(10)]
    standard = [dict(id="test_Art_1", question="<image 1> Which style?", options=str(ten), explanation="",
                     image_1=cell(RED), img_type="['Paintings']", answer="J", topic_difficulty="Hard", subject="Art")]
    write(root / "standard (10 options)" / "test-00000-of-00001.parquet", standard, MMMU_PRO_STANDARD)
    write(root / "standard (4 options)" / "test-00000-of-00001.parquet",
          [dict(standard[0], id="four", options=str(ten[:4]), answer="A")], MMMU_PRO_STANDARD)
    vision = [dict(id="test_Art_1", image=cell(BLUE), options=str(ten), answer="J", subject="Art"),
              dict(id="test_Art_2", image=cell(GREEN), options=str(ten), answer="D", subject="Art")]
    write(root / "vision" / "test-00000-of-00001.parquet", vision, MMMU_PRO_VISION)
    (std,) = load_benchmark("mmmu_pro_standard", str(root))
    assert (std.id, std.answer, std.choice_letters()[-1], std.images) == ("mmmu_pro_standard/test_Art_1", "J", "J", [RED])
    assert "(J) option 9" in benchmark_prompt(std)
    vision_records, report = load_benchmark_with_report("mmmu_pro_vision", str(root))
    assert report.num_skipped == 0 and [r.answer for r in vision_records] == ["J", "D"]
    first = vision_records[0]
    assert (first.question, first.images, first.choices) == (MMMU_PRO_VISION_QUESTION, [BLUE], ten)
    assert "option 9" not in benchmark_prompt(first)  # the options are only in the screenshot


def test_unknown_benchmark_and_missing_split_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'mmbench'"):
        load_benchmark("mmbench", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data/testmini-"):
        load_benchmark("mathvista", str(tmp_path))


def test_mmmu_pro_vision_options_stored_as_a_list_column(tmp_path):
    """Re-packaged copies store ``options`` as a list of strings instead of the list literal: both load alike."""
    import pyarrow as pa

    schema = dict(MMMU_PRO_VISION, options=pa.list_(pa.string()))
    path = write(tmp_path / "vision.parquet", [dict(id="1", image=cell(RED), options=["it's", "b", "c"], answer="A",
                                                    subject="Art")], schema)
    (record,) = load_benchmark("mmmu_pro_vision", str(path))
    assert (record.choices, record.answer) == (["it's", "b", "c"], "A")
