"""Verifier accuracy / format / overall (CARE_SPEC.md section 1) over a table of answer cases.

Each case is (answer text, ground truth, answer_type, choices, expected accuracy); the answer is put
into a well-formed response, so format is 1 and overall = 0.9 * accuracy + 0.1.
"""
import math

import pytest

from care_megatron.rewards.parsing import REASONING_TAGS
from care_megatron.rewards.verifier import (
    RewardScore,
    VerifierConfig,
    infer_answer_type,
    parse_number,
    score,
)


def wrap(answer: str, think: str = "Reasoning about the figure.") -> str:
    return f"<think>{think}</think>\n<answer>{answer}</answer>"


MC4 = ["12 cm", "15 cm", "18 cm", "20 cm"]
MC_WORDS = ["red", "green", "blue", "yellow", "purple"]
MC_DICT = {"A": "triangle", "B": "square", "C": "circle"}

MULTIPLE_CHOICE = [
    ("B", "B", "multiple_choice", None, 1),
    ("(B)", "B", "multiple_choice", None, 1),
    ("B.", "B", "multiple_choice", None, 1),
    ("B)", "B", "multiple_choice", None, 1),
    ("Option B", "B", "multiple_choice", None, 1),
    ("option (B)", "B", "multiple_choice", None, 1),
    ("The answer is B", "B", "multiple_choice", None, 1),
    ("the answer is B.", "B", "multiple_choice", None, 1),
    ("The correct answer is (B).", "B", "multiple_choice", None, 1),
    ("Answer: B", "B", "multiple_choice", None, 1),
    ("Choice C", "C", "multiple_choice", None, 1),
    ("\\boxed{B}", "B", "multiple_choice", None, 1),
    ("$\\boxed{\\text{B}}$", "B", "multiple_choice", None, 1),
    (" B ", "(B)", "multiple_choice", None, 1),
    ("C", "B", "multiple_choice", None, 0),
    ("(C)", "B", "multiple_choice", None, 0),
    ("The answer is A", "B", "multiple_choice", None, 0),
    ("A or B", "B", "multiple_choice", None, 0),
    ("A, B", "B", "multiple_choice", None, 0),
    ("AB", "B", "multiple_choice", None, 0),
    ("b", "B", "multiple_choice", MC4, 1),
    ("15 cm", "B", "multiple_choice", MC4, 1),
    ("15cm", "B", "multiple_choice", MC4, 1),
    ("15", "B", "multiple_choice", MC4, 1),
    ("B. 15 cm", "B", "multiple_choice", MC4, 1),
    ("(B) 15 cm", "B", "multiple_choice", MC4, 1),
    ("B. 18 cm", "B", "multiple_choice", MC4, 0),
    ("18 cm", "B", "multiple_choice", MC4, 0),
    ("E", "B", "multiple_choice", MC4, 0),
    ("The answer is (B) 15 cm", "B", "multiple_choice", MC4, 1),
    ("Answer: B. 15 cm", "B", "multiple_choice", MC4, 1),
    ("The answer is 15 cm", "B", "multiple_choice", MC4, 1),
    ("The answer is (C) 18 cm", "B", "multiple_choice", MC4, 0),
    ("(B) 18 cm", "B", "multiple_choice", MC4, 0),  # letter and text disagree: not credited
    ("the answer is b", "B", "multiple_choice", None, 1),
    ("a", "B", "multiple_choice", None, 0),
    ("B", "15 cm", "multiple_choice", MC4, 1),
    ("(B)", "15 cm", "multiple_choice", MC4, 1),
    ("15 cm", "15 cm", "multiple_choice", MC4, 1),
    ("C", "15 cm", "multiple_choice", MC4, 0),
    ("Blue", "blue", "multiple_choice", MC_WORDS, 1),
    ("C", "blue", "multiple_choice", MC_WORDS, 1),
    ("C. blue", "blue", "multiple_choice", MC_WORDS, 1),
    ("D", "blue", "multiple_choice", MC_WORDS, 0),
    ("green", "blue", "multiple_choice", MC_WORDS, 0),
    ("E", "purple", "multiple_choice", MC_WORDS, 1),
    ("circle", "C", "multiple_choice", MC_DICT, 1),
    ("C", "circle", "multiple_choice", MC_DICT, 1),
    ("Square", "C", "multiple_choice", MC_DICT, 0),
    # answer_type inferred from choices / from a lone capital letter
    ("(A)", "A", None, None, 1),
    ("D", "A", None, None, 0),
    ("12 cm", "12 cm", None, MC4, 1),
    ("A", "12 cm", None, MC4, 1),
    ("Option D", "20 cm", None, MC4, 1),
]

NUMBERS = [
    ("42", "42", "integer", None, 1),
    ("42.0", "42", "integer", None, 1),
    ("+42", "42", "integer", None, 1),
    ("43", "42", "integer", None, 0),
    ("-7", "-7", "integer", None, 1),
    ("−7", "-7", "integer", None, 1),
    ("7", "-7", "integer", None, 0),
    ("1,234", "1234", "integer", None, 1),
    ("1,234,567", "1234567", "integer", None, 1),
    ("1234567", "1,234,567", "integer", None, 1),
    ("10001", "10000", "integer", None, 0),
    ("12 cm", "12", "integer", None, 1),
    ("12 apples", "12", "integer", None, 1),
    ("12 m^2", "12", "integer", None, 1),
    ("12 km/h", "12", "integer", None, 1),
    ("$12", "12", "integer", None, 1),
    ("\\$12", "12", "integer", None, 1),
    ("45°", "45", "integer", None, 1),
    ("45^\\circ", "45", "integer", None, 1),
    ("45^{\\circ}", "45", "integer", None, 1),
    ("50%", "50", "integer", None, 1),
    ("50\\%", "50", "integer", None, 1),
    ("x = 5", "5", "integer", None, 1),
    ("2 + 3 = 5", "5", "integer", None, 1),
    ("The answer is 5.", "5", "integer", None, 1),
    ("\\boxed{5}", "5", "integer", None, 1),
    ("$5$", "5", "integer", None, 1),
    ("5 or 6", "5", "integer", None, 0),
    ("3 red and 4 blue", "7", "integer", None, 0),
    ("five", "5", "integer", None, 0),
    ("\\sqrt{4}", "2", "integer", None, 1),
    ("2^{3}", "8", "integer", None, 1),
    ("1.5e3", "1500", "integer", None, 1),
    ("1.5 \\times 10^{3}", "1500", "integer", None, 1),
    ("1.5×10^3", "1500", "integer", None, 1),
    ("0.5", "0.5", "float", None, 1),
    (".5", "0.5", "float", None, 1),
    ("1/2", "0.5", "float", None, 1),
    ("\\frac{1}{2}", "0.5", "float", None, 1),
    ("\\dfrac{1}{2}", "0.5", "float", None, 1),
    ("\\frac12", "0.5", "float", None, 1),
    ("-\\frac{3}{4}", "-0.75", "float", None, 1),
    ("0.5", "\\frac{1}{2}", "float", None, 1),
    ("0.5", "1/2", "float", None, 1),
    ("3.14159", "3.1416", "float", None, 1),
    ("3.1416", "3.14159", "float", None, 1),
    ("3.15", "3.14159", "float", None, 0),
    ("3.14", "3.14159", "float", None, 0),
    ("1.00009", "1", "float", None, 1),
    ("1.0002", "1", "float", None, 0),
    ("1.5e-3", "0.0015", "float", None, 1),
    ("1.5E-3", "0.0015", "float", None, 1),
    ("2.5 \\times 10^{-3}", "0.0025", "float", None, 1),
    ("6.02e23", "6.02 \\times 10^{23}", "float", None, 1),
    ("0", "0", "float", None, 1),
    ("0.0", "0", "float", None, 1),
    ("1e-12", "0", "float", None, 1),
    ("0.001", "0", "float", None, 0),
    ("0.333333", "1/3", "float", None, 1),
    ("0.33", "1/3", "float", None, 0),
    ("\\sqrt{2}", "1.41421", "float", None, 1),
    ("12.5%", "12.5", "float", None, 1),
    ("2.50 dollars", "2.5", "float", None, 1),
    ("\\$1,200.50", "1200.5", "float", None, 1),
    ("√2", "1.41421", "float", None, 1),
    # MathVista-style free-form answers (integer / float with precision, units stripped)
    ("16", "16", None, None, 1),
    ("1.45", "1.45", None, None, 1),
    ("1.450", "1.45", None, None, 1),
    ("1.4", "1.45", None, None, 0),
    ("0.28", "0.28", None, None, 1),
    ("2.0", "2", None, None, 1),
    ("7 years", "7", None, None, 1),
    ("1,000", "1000", None, None, 1),
    ("31.1", "31.1", None, None, 1),
    ("31.2", "31.1", None, None, 0),
    (3, 3, None, None, 1),
]

LATEX = [
    ("x^2+2x+1", "(x+1)^2", "latex", None, 1),
    ("(x+1)^2", "x^2+2x+1", "latex", None, 1),
    ("x^2+2x", "(x+1)^2", "latex", None, 0),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", "latex", None, 1),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", "latex", None, 1),
    ("\\sqrt{3}", "\\frac{\\sqrt{2}}{2}", "latex", None, 0),
    ("2\\pi", "2\\pi", "latex", None, 1),
    ("\\pi", "2\\pi", "latex", None, 0),
    ("\\frac{\\pi}{3}", "60^\\circ", "latex", None, 0),
    ("\\{1,2\\}", "\\{2,1\\}", "latex", None, 1),
    ("\\{1,3\\}", "\\{1,2\\}", "latex", None, 0),
    ("(1, 2)", "(1,2)", "latex", None, 1),
    ("y = 2x + 3", "y=2x+3", "latex", None, 1),
    ("$\\frac{3}{4}$", "0.75", "latex", None, 1),
    ("\\boxed{\\frac{3}{4}}", "\\frac{3}{4}", "latex", None, 1),
    ("3\\sqrt{3}", "\\sqrt{27}", "latex", None, 1),
    ("\\sqrt{27}", "5.196152", "latex", None, 1),
    ("x \\in [0, 1]", "[0,1]", "latex", None, 1),
    ("a+b", "b+a", "latex", None, 1),
    ("a-b", "b-a", "latex", None, 0),
    ("\\frac{1}{2}", "\\frac{2}{4}", None, None, 1),
    ("x^{2}", "x^2", None, None, 1),
    ("\\log_2 8", "3", "latex", None, 1),
    ("∞", "\\infty", "latex", None, 1),
    ("2√2", "\\sqrt{8}", "latex", None, 1),
    ("2π", "2\\pi", "latex", None, 1),
    ("π", "2\\pi", "latex", None, 0),
    ("\\frac{6}{8}", "\\frac{3}{4}", "latex", None, 1),
    ("\\sqrt{2}+1", "1+\\sqrt{2}", "latex", None, 1),
]

TEXT = [
    ("Paris", "paris", "text", None, 1),
    ("  PARIS  ", "Paris", "text", None, 1),
    ("Paris.", "Paris", "text", None, 1),
    ("The Eiffel Tower!", "eiffel tower", "text", None, 1),
    ("eiffel   tower", "The Eiffel Tower", "text", None, 1),
    ("London", "Paris", "text", None, 0),
    ("Paris, France", "Paris", "text", None, 0),
    ("yes", "Yes", "text", None, 1),
    ("No", "yes", "text", None, 0),
    ("Café", "café", "text", None, 1),
    ("ＰＡＲＩＳ", "paris", "text", None, 1),
    ("東京", "東京", "text", None, 1),
    ("東京", "大阪", "text", None, 0),
    ("\\text{blue}", "blue", "text", None, 1),
    ("red-blue", "red blue", "text", None, 1),
    ("it's", "its", "text", None, 0),
    ("2", "2.0", "text", None, 1),
    ("rectangle", "Rectangle", None, None, 1),
    ("circle", "square", None, None, 0),
    ("a cat", "cat", None, None, 1),
]

ALL_CASES = MULTIPLE_CHOICE + NUMBERS + LATEX + TEXT


def test_case_table_size():
    assert len(ALL_CASES) >= 150


@pytest.mark.parametrize("answer,truth,answer_type,choices,expected", ALL_CASES)
def test_accuracy_table(answer, truth, answer_type, choices, expected):
    result = score(wrap(str(answer)), truth, answer_type, choices)
    assert isinstance(result, RewardScore)
    assert result.accuracy == expected, result.reason
    assert result.format == 1.0
    assert result.overall == pytest.approx(0.9 * expected + 0.1)
    assert result.reason


# --- format and the overall formula ----------------------------------------------------------

FORMAT_CASES = [
    ("<think>r</think><answer>4</answer>", 1, 1),
    ("<think>r</think>\n\n<answer>4</answer>\n", 1, 1),
    ("  <think>r</think> <answer> 4 </answer>", 1, 1),
    ("<think>r</think><answer>4</answer> trailing words", 1, 0),
    ("preamble <think>r</think><answer>4</answer>", 1, 0),
    ("<think>r</think> middle <answer>4</answer>", 1, 0),
    ("<answer>4</answer><think>r</think>", 1, 0),
    ("<think>r</think><answer>4</answer><answer>5</answer>", 1, 0),
    ("<think>r</think><think>s</think><answer>4</answer>", 1, 0),
    ("<think>r <answer>4</answer>", 1, 0),  # unclosed think: it ends where the answer begins
    ("<answer>4</answer>", 1, 0),
    ("<think>r</think>4", 0, 0),
    ("<think>r</think><answer>4", 0, 0),
    ("4", 0, 0),
    ("", 0, 0),
    ("<think></think><answer></answer>", 0, 1),
    ("<think>r</think><answer>   </answer>", 0, 1),
    ("<think>r</think><answer>The <answer>4</answer> is it</answer>", 0, 0),
    ("<think>I will put 4 in <answer> tags</think><answer>4</answer>", 1, 0),
    ("<think>r</think><answer>4</think></answer>", 0, 0),
    ("<THINK>r</THINK><ANSWER>4</ANSWER>", 0, 0),
]


@pytest.mark.parametrize("response,accuracy,fmt", FORMAT_CASES)
def test_format_and_accuracy(response, accuracy, fmt):
    result = score(response, "4", "integer")
    assert (result.accuracy, result.format) == (accuracy, fmt), result.reason
    assert result.overall == pytest.approx(0.9 * accuracy + 0.1 * fmt)
    if fmt == 0:
        assert "format" in result.reason


@pytest.mark.parametrize("w_fmt", [0.0, 0.1, 0.25, 1.0])
@pytest.mark.parametrize("response,acc,fmt", [(wrap("4"), 1, 1), (wrap("5"), 0, 1), ("<answer>4</answer>", 1, 0), ("junk", 0, 0)])
def test_overall_formula(w_fmt, response, acc, fmt):
    result = score(response, "4", config=VerifierConfig(format_weight=w_fmt))
    assert (result.accuracy, result.format) == (acc, fmt)
    assert result.overall == pytest.approx((1 - w_fmt) * acc + w_fmt * fmt)


def test_rel_tol_configurable():
    assert score(wrap("1.01"), "1", "float").accuracy == 0
    assert score(wrap("1.01"), "1", "float", config=VerifierConfig(rel_tol=0.02)).accuracy == 1
    assert score(wrap("1.03"), "1", "float", config=VerifierConfig(rel_tol=0.02)).accuracy == 0


def test_reasoning_tag_variant():
    cfg = VerifierConfig(tags=REASONING_TAGS)
    good = "<reasoning>two plus two</reasoning><answer>4</answer>"
    assert score(good, "4", config=cfg).overall == 1.0
    assert score(good, "4").format == 0.0  # default tags: no <think> span
    assert score(wrap("4"), "4", config=cfg).format == 0.0


def test_verifier_reads_only_the_answer_span():
    # The right answer in the rationale, a wrong one in the answer span: wrong.
    assert score(wrap("5", think="the answer is 4"), "4").accuracy == 0
    assert score(wrap("4", think="maybe 5? no"), "4").accuracy == 1
    # Unclosed answer (truncated generation): nothing to read.
    r = score("<think>the answer is 4</think><answer>4", "4")
    assert r.accuracy == 0 and r.extracted is None and "answer span" in r.reason


def test_ambiguous_option_text_is_not_credited():
    r = score(wrap("411 cm"), "D", "multiple_choice", ["331 cm", "411 cm", "396 cm", "411 cm"])
    assert r.accuracy == 0 and "several options (B, D)" in r.reason
    assert score(wrap("D"), "D", "multiple_choice", ["331 cm", "411 cm", "396 cm", "411 cm"]).accuracy == 1


def test_list_ground_truth_means_any_of():
    assert score(wrap("Paris"), ["paris", "Paris, France"], "text").accuracy == 1
    assert score(wrap("Lyon"), ["paris", "Paris, France"], "text").accuracy == 0


# --- adversarial model output: never raises ---------------------------------------------------

ADVERSARIAL = [
    None,
    "",
    " ",
    "<",
    "</answer>",
    "<answer>",
    "<think>" * 5000,
    "<answer>" * 5000 + "4" + "</answer>" * 5000,
    "<think>" + "x" * 100_000 + "</think><answer>4</answer>",
    "<think>r</think><answer>" + "9" * 100_000 + "</answer>",
    "<think>r</think><answer>" + "(" * 3000 + "</answer>",
    "<think>r</think><answer>\\frac{" * 200 + "</answer>",
    "<think>r</think><answer>\x00\ud800\uffff</answer>",
    "<think>🙂</think><answer>🙂</answer>",
    "<think>r</think><answer>" + "1/0" + "</answer>",
    "<think>r</think><answer>" + "1e99999" + "</answer>",
    "<think>r</think><answer>" + "\\boxed{" * 50 + "</answer>",
    "<think>r</think><answer>NaN</answer>",
    "<think>r</think><answer>inf</answer>",
    b"<think>bytes</think><answer>4</answer>",
    12345,
]


@pytest.mark.parametrize("response", ADVERSARIAL, ids=lambda r: repr(r)[:30])
@pytest.mark.parametrize("answer_type", [None, "multiple_choice", "integer", "float", "text", "latex"])
def test_adversarial_outputs_never_raise(response, answer_type):
    result = score(response, "4", answer_type, ["3", "4"] if answer_type == "multiple_choice" else None)
    assert result.accuracy in (0.0, 1.0) and result.format in (0.0, 1.0)
    assert 0.0 <= result.overall <= 1.0
    assert isinstance(result.reason, str) and result.reason


def test_huge_response_with_correct_answer():
    response = "<think>" + "step. " * 20_000 + "</think><answer>4</answer>"
    assert len(response) > 100_000
    assert score(response, "4").overall == 1.0


@pytest.mark.parametrize("answer_type", ["integer", "float", "latex", "text"])
def test_thousand_digit_answers(answer_type):
    big = "9" * 1500
    r = score(wrap(big), big, answer_type)
    assert r.accuracy == 1.0 and "grader error" not in r.reason
    r = score(wrap(big), "1" + big, answer_type)
    assert r.accuracy == 0.0 and "grader error" not in r.reason


def test_huge_answer_rejected_with_reason():
    r = score(wrap("4" + " " * 5000), "4", config=VerifierConfig(max_answer_chars=100))
    assert r.accuracy == 0 and "longer than" in r.reason


def test_unknown_answer_type_is_a_config_error():
    with pytest.raises(ValueError, match="answer_type"):
        score(wrap("4"), "4", "roman_numeral")


@pytest.mark.parametrize(
    "field,value", [("format_weight", 1.5), ("rel_tol", -1.0), ("math_timeout_s", 0.0), ("max_answer_chars", 0)]
)
def test_config_validation_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        VerifierConfig(**{field: value})


# --- helpers --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "truth,choices,expected",
    [
        ("B", None, "multiple_choice"),
        ("(C)", None, "multiple_choice"),
        ("12 cm", ["12 cm", "13 cm"], "multiple_choice"),
        ("42", None, "integer"),
        ("1,000", None, "integer"),
        ("3.5", None, "float"),
        ("1/2", None, "float"),
        (7, None, "integer"),
        (0.25, None, "float"),
        ("\\frac{\\pi}{2}", None, "latex"),
        ("x^2 + 1", None, "latex"),
        ("2x+1", None, "latex"),
        ("Paris", None, "text"),
        ("red-blue", None, "text"),
        ("x-y", None, "latex"),
        ("2+3", None, "latex"),
        ("(1, 2)", None, "latex"),
        ("a dog", None, "text"),
    ],
)
def test_infer_answer_type(truth, choices, expected):
    assert infer_answer_type(truth, choices) == expected


@pytest.mark.parametrize(
    "text,value",
    [
        ("1,234.5", 1234.5),
        ("-3/4", -0.75),
        ("\\frac{1}{8}", 0.125),
        ("2.5 \\times 10^{3}", 2500.0),
        ("1e-3", 0.001),
        ("45°", 45.0),
        ("  $7$ ", 7.0),
        ("7 cm^2", 7.0),
        ("1,2", None),
        ("1/0", None),
        ("abc", None),
        ("2 + 3", None),
        ("1e999999", None),
    ],
)
def test_parse_number(text, value):
    result = parse_number(text)
    if value is None:
        assert result is None
    else:
        assert math.isclose(float(result), value)


# --- MathVista-style records -----------------------------------------------------------------

MATHVISTA = [
    # (answer span, answer field, question_type, answer_type, choices, expected)
    ("(C)", "18 cm", "multi_choice", "text", MC4, 1),
    ("18 cm", "18 cm", "multi_choice", "text", MC4, 1),
    ("B", "18 cm", "multi_choice", "text", MC4, 0),
    ("27", "27", "free_form", "integer", None, 1),
    ("27.0", "27", "free_form", "integer", None, 1),
    ("28", "27", "free_form", "integer", None, 0),
    ("0.6", "0.6", "free_form", "float", None, 1),
    ("0.60", "0.6", "free_form", "float", None, 1),
    ("3/5", "0.6", "free_form", "float", None, 1),
    ("0.61", "0.6", "free_form", "float", None, 0),
    ("Yes", "Yes", "free_form", "text", None, 1),
    ("no", "Yes", "free_form", "text", None, 0),
]


@pytest.mark.parametrize("answer,truth,question_type,answer_type,choices,expected", MATHVISTA)
def test_mathvista_records(answer, truth, question_type, answer_type, choices, expected):
    # MathVista's question_type names work directly as answer_type; free_form infers from the answer.
    assert score(wrap(answer), truth, question_type, choices).accuracy == expected
    kind = "multiple_choice" if question_type == "multi_choice" else answer_type
    assert score(wrap(answer), truth, kind, choices).accuracy == expected


@pytest.mark.parametrize(
    "answer,truth,expected",
    [("1.52", "1.5", 1), ("1.46", "1.5", 1), ("1.56", "1.5", 0), ("1.454", "1.45", 1), ("1.456", "1.45", 0), ("2", "2.0", 1)],
)
def test_round_to_truth_decimals(answer, truth, expected):
    cfg = VerifierConfig(round_to_truth_decimals=True)
    assert score(wrap(answer), truth, "float", config=cfg).accuracy == expected
    if answer != "2":
        assert score(wrap(answer), truth, "float").accuracy == 0  # rel_tol alone rejects them
