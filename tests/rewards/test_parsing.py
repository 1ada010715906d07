"""parse_response: spans, format validity, robustness, tag variants (CARE_SPEC.md section 1)."""
import pytest

from care_megatron.rewards.parsing import DEFAULT_TAGS, REASONING_TAGS, TagConfig, parse_response


def test_well_formed_spans_and_texts():
    text = "<think>add them</think>\n<answer>7</answer>"
    p = parse_response(text)
    assert p.format_ok and p.think_closed and not p.problems
    assert (p.think, p.answer) == ("add them", "7")
    assert p.think_span == (0, len("<think>add them</think>"))
    assert text[p.think_span[0] : p.think_span[1]] == "<think>add them</think>"
    assert text[p.answer_span[0] : p.answer_span[1]] == "<answer>7</answer>"


@pytest.mark.parametrize(
    "text,think,answer,format_ok",
    [
        ("<think>a</think><answer>b</answer>", "a", "b", True),
        ("\n <think>a</think>\t<answer>b</answer>\n", "a", "b", True),
        ("<think></think><answer></answer>", "", "", True),
        ("<think>a</think><answer>b</answer>x", "a", "b", False),
        ("x<think>a</think><answer>b</answer>", "a", "b", False),
        ("<think>a</think>x<answer>b</answer>", "a", "b", False),
        ("<answer>b</answer><think>a</think>", "a", "b", False),  # answer before think
        ("<answer>b</answer>", None, "b", False),  # missing think
        ("<think>a</think>", "a", None, False),  # missing answer
        ("<think>a", "a", None, False),  # unclosed think
        ("<think>a<answer>b</answer>", "a", "b", False),  # unclosed think ends at the answer
        ("<think>a</think><answer>b", "a", None, False),  # unclosed answer: no answer span
        ("<think>a</think><think>c</think><answer>b</answer>", "a", "b", False),  # repeated think
        ("<think>a</think><answer>b</answer><answer>c</answer>", "a", "b", False),  # repeated answer
        ("<think>x<think>y</think>z</think><answer>b</answer>", "x<think>y", "b", False),  # nested think
        ("<think>a</think><answer>b<answer>c</answer>d</answer>", "a", "b<answer>c", False),  # nested answer
        ("<think>use <answer> tags</think><answer>b</answer>", "use <answer> tags", "b", False),
        ("</think><answer>b</answer>", None, "b", False),
        ("", None, None, False),
        ("just text", None, None, False),
        ("<think>ü 你好 🙂</think><answer>東京</answer>", "ü 你好 🙂", "東京", True),
    ],
)
def test_parse_cases(text, think, answer, format_ok):
    p = parse_response(text)
    assert (p.think, p.answer, p.format_ok) == (think, answer, format_ok)
    assert p.format_ok == (not p.problems)
    if p.answer is not None:
        inner = text[p.answer_span[0] : p.answer_span[1]]
        assert inner == f"<answer>{p.answer}</answer>"
    if p.think_span is not None:
        assert text[p.think_span[0] : p.think_span[1]].startswith("<think>")


def test_nested_answer_flagged():
    p = parse_response("<think>a</think><answer>b<answer>c</answer>d</answer>")
    assert p.answer_has_tags
    assert not parse_response("<think>a</think><answer>b</answer>").answer_has_tags


def test_reasoning_variant():
    text = "<reasoning>look</reasoning><answer>3</answer>"
    p = parse_response(text, REASONING_TAGS)
    assert p.format_ok and (p.think, p.answer) == ("look", "3")
    assert not parse_response(text, DEFAULT_TAGS).format_ok
    assert parse_response(text, DEFAULT_TAGS).answer == "3"


def test_think_open_in_prompt():
    tags = TagConfig(think_open_in_prompt=True)
    p = parse_response("reasoning here</think>\n<answer>3</answer>", tags)
    assert p.format_ok and p.think == "reasoning here" and p.think_span == (0, len("reasoning here</think>"))
    assert not parse_response("<think>r</think><answer>3</answer>", tags).format_ok
    # an empty rationale is well-formed, as <think></think> is with the default tags
    assert parse_response("</think><answer>3</answer>", tags).format_ok
    assert not parse_response("no close<answer>3</answer>", tags).format_ok
    assert parse_response("no close<answer>3</answer>", tags).think == "no close"


@pytest.mark.parametrize("bad", ["", "a b", "<x>", "x/y", None])
def test_tag_config_validation(bad):
    with pytest.raises(ValueError, match="think_tag"):
        TagConfig(think_tag=bad)


def test_tag_config_distinct():
    with pytest.raises(ValueError, match="answer_tag"):
        TagConfig(think_tag="answer")


@pytest.mark.parametrize("n", [100_000, 400_000])
def test_huge_inputs_parse(n):
    # Many near-tags and partial tags: a backtracking parser would blow up on these.
    for body in ("<" * n, "<thin" * (n // 5), "<think>" * (n // 7), "</answer" * (n // 8), "x" * n):
        text = "<think>" + body + "</think><answer>ok</answer>"
        p = parse_response(text)
        assert p.answer == "ok" or p.answer is None
        assert len(p.text) == len(text)
    p = parse_response("<think>" + "a" * n + "</think><answer>ok</answer>")
    assert p.format_ok and p.answer == "ok" and len(p.think) == n


def test_non_string_input_is_empty_response():
    assert parse_response(None).answer is None
    assert not parse_response(None).format_ok
