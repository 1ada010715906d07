"""Each benchmark's official answer rules applied to the <answer> span (closed-form cases)."""
from __future__ import annotations

import pytest

from care_megatron.data.schema import Record
from care_megatron.evaluation.benchmarks import (
    edit_distance, mmmu_choice, mmmu_open_predictions, score_benchmark, score_benchmark_detail,
)


def answer(text: str) -> str:
    return f"<think>some reasoning</think><answer>{text}</answer>"


def mathvista_mc() -> Record:
    return Record(id="mathvista/1", source="mathvista", images=[], question="Which?", answer="C", answer_type="multiple_choice",
                  choices=["3.5 cm", "5 cm", "7 cm"], metadata={"answer_text": "7 cm", "answer_type": "text",
                                                                "question_type": "multi_choice", "precision": None})


def mathvista_free(key: str, kind: str, precision=None) -> Record:
    return Record(id="mathvista/2", source="mathvista", images=[], question="?", answer=key,
                  answer_type={"float": "float", "integer": "integer", "list": "latex"}.get(kind, "text"),
                  metadata={"answer_text": key, "answer_type": kind, "question_type": "free_form", "precision": precision})


def test_no_answer_span_scores_zero_for_every_benchmark():
    record = mathvista_mc()
    for name in ("mathvista", "mathverse", "mathvision", "mmmu", "mmmu_pro_standard", "mmmu_pro_vision"):
        assert score_benchmark(name, record, "<think>C</think> C") == 0.0
        assert score_benchmark(name, record, "") == 0.0
        assert score_benchmark_detail(name, record, "C").reason == "no <answer> span"


@pytest.mark.parametrize("span,expected", [
    ("C", 1.0), ("(C)", 1.0), ("The answer is (C).", 1.0), ("7 cm", 1.0), ("7cm", 1.0),  # edit distance 1 -> "7 cm"
    ("B", 0.0), ("(A) 7 cm", 0.0),  # a bracketed letter wins over the text, as in the official normaliser
    ("5", 0.0),  # nearest option by edit distance is "5 cm"
])
def test_mathvista_multi_choice_letter_text_or_nearest_option(span, expected):
    assert score_benchmark("mathvista", mathvista_mc(), answer(span)) == expected


@pytest.mark.parametrize("key,precision,span,expected", [
    ("1.5", 1, "1.5", 1.0), ("1.5", 1, "1.50", 1.0), ("1.5", 1, "1.46", 1.0), ("1.5", 1, "1.44", 0.0),
    ("0.33", 2, "0.333", 1.0), ("0.33", 2, "0.3", 0.0), ("0.33", 2, "1/3", 0.0),  # float() of "1/3" fails
    ("2.25", 2.0, "2.249", 1.0), ("2.25", 2.0, "2.2", 0.0),
])
def test_mathvista_float_rounds_to_the_rows_precision(key, precision, span, expected):
    record = mathvista_free(key, "float", precision)
    assert score_benchmark("mathvista", record, answer(span)) == expected


def test_mathvista_integer_and_list_types():
    assert score_benchmark("mathvista", mathvista_free("12", "integer"), answer("12.0")) == 1.0
    assert score_benchmark("mathvista", mathvista_free("12", "integer"), answer("11.9")) == 0.0  # int() truncates
    detail = score_benchmark_detail("mathvista", mathvista_free("12", "integer"), answer("twelve"))
    assert detail.score == 0.0 and "not a integer" in detail.reason
    assert score_benchmark("mathvista", mathvista_free("[1, 2, 3]", "list"), answer("[1,2,3]")) == 1.0
    assert score_benchmark("mathvista", mathvista_free("[1, 2, 3]", "list"), answer("[1, 3, 2]")) == 0.0


def test_mathvista_float_without_precision_compares_values():
    assert score_benchmark("mathvista", mathvista_free("0.5", "float", None), answer("0.50")) == 1.0


def mmmu_mc(options, key="B", name="mmmu") -> Record:
    return Record(id=f"{name}/1", source=name, images=[], question="?", answer=key, answer_type="multiple_choice",
                  choices=list(options))


@pytest.mark.parametrize("span,expected", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("b", "B"), ("Hooke's law", "B"), ("hooke's   LAW", "B"),
    ("I think (A) is wrong, so (B)", "B"),  # several bracketed letters: the last one
    ("The answer is C because", "C"),
    ("by the reasoning above the correct choice must be hooke's law", "B"),  # > 5 words: option text inside
    ("no idea", None),  # the official parser guesses at random here; we give no letter
])
def test_mmmu_choice_parsing(span, expected):
    assert mmmu_choice(span, ["Newton's first law", "Hooke's law", "Ohm's law", "none"]) == expected


def test_mmmu_and_mmmu_pro_multiple_choice_scores():
    options = ["Newton's first law", "Hooke's law", "Ohm's law", "none"]
    assert score_benchmark("mmmu", mmmu_mc(options), answer("(B)")) == 1.0
    assert score_benchmark("mmmu", mmmu_mc(options), answer("Hooke's law")) == 1.0
    assert score_benchmark("mmmu", mmmu_mc(options), answer("A")) == 0.0
    assert score_benchmark_detail("mmmu", mmmu_mc(options), answer("no idea")).reason.startswith("no option letter")
    ten = [f"option {k}" for k in range(10)]
    for name in ("mmmu_pro_standard", "mmmu_pro_vision"):
        assert score_benchmark(name, mmmu_mc(ten, "J", name), answer("J")) == 1.0
        assert score_benchmark(name, mmmu_mc(ten, "J", name), answer("option 9")) == 1.0
        assert score_benchmark(name, mmmu_mc(ten, "J", name), answer("I")) == 0.0


def test_mmmu_open_answers_follow_eval_open():
    def open_record(key):
        return Record(id="mmmu/2", source="mmmu", images=[], question="?", answer=key, answer_type="text")

    assert mmmu_open_predictions("so the speed is 3.50 m/s") == ["3.50 m/s", 3.5]
    assert score_benchmark("mmmu", open_record("3.5"), answer("so the speed is 3.50 m/s")) == 1.0
    assert score_benchmark("mmmu", open_record("3.5"), answer("3.499")) == 1.0  # both round to 3.5 (2 decimals)
    assert score_benchmark("mmmu", open_record("3.5"), answer("3.6")) == 0.0
    assert score_benchmark("mmmu", open_record("1,200"), answer("1200")) == 1.0
    assert score_benchmark("mmmu", open_record("Paris"), answer("The capital is Paris")) == 1.0  # key inside the phrase
    assert score_benchmark("mmmu", open_record("['24', '24.0']"), answer("24.00")) == 1.0  # a list of keys
    assert score_benchmark("mmmu", open_record("b"), answer("about")) == 0.0  # one-letter keys need a word boundary


def test_mathvision_and_mathverse_letter_or_value():
    mc = Record(id="mathvision/1", source="mathvision", images=[], question="?", answer="D", answer_type="multiple_choice",
                choices=["1", "2", "3", "4", "5"])
    assert score_benchmark("mathvision", mc, answer("D")) == 1.0
    assert score_benchmark("mathvision", mc, answer("4")) == 1.0  # the option's text
    assert score_benchmark("mathvision", mc, answer("C")) == 0.0
    value = Record(id="mathvision/2", source="mathvision", images=[], question="?", answer="0.5", answer_type="float")
    assert score_benchmark("mathvision", value, answer("\\frac{1}{2}")) == 1.0
    assert score_benchmark("mathvision", value, answer("0.6")) == 0.0
    verse_mc = Record(id="mathverse/1", source="mathverse", images=[], question="?", answer="B",
                      answer_type="multiple_choice", choices=["40°", "50°", "60°", "70°"])
    assert score_benchmark("mathverse", verse_mc, answer("B")) == 1.0
    assert score_benchmark("mathverse", verse_mc, answer("50°")) == 1.0
    assert score_benchmark("mathverse", verse_mc, answer("A")) == 0.0
    verse_free = Record(id="mathverse/2", source="mathverse", images=[], question="?", answer="2\\sqrt{3}", answer_type="latex")
    assert score_benchmark("mathverse", verse_free, answer("\\sqrt{12}")) == 1.0
    assert score_benchmark("mathverse", verse_free, answer("3")) == 0.0


def test_judge_hook_grades_open_answers_only():
    calls = []

    def judge(question, key, extracted):
        calls.append((question, key, extracted))
        return 0.75

    free = Record(id="mathverse/2", source="mathverse", images=[], question="Find x.", answer="2\\sqrt{3}",
                  answer_type="latex", metadata={"question_for_eval": "Find x in the triangle."})
    detail = score_benchmark_detail("mathverse", free, answer("about 3.46"), judge=judge)
    assert (detail.score, detail.reason, calls) == (0.75, "judge", [("Find x in the triangle.", "2\\sqrt{3}", "about 3.46")])
    mc = mmmu_mc(["a", "b"])
    assert score_benchmark_detail("mmmu", mc, answer("B"), judge=judge).score == 1.0 and len(calls) == 1
    assert score_benchmark_detail("mathverse", free, "no span", judge=judge).score == 0.0 and len(calls) == 1


def test_edit_distance_closed_forms():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "abc") == 0
