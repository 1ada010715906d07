"""token_regions with real BPE tokenizers whose tokens split the tag strings (CARE_SPEC.md section 6)."""
import pytest
import torch

from care_megatron.rewards.parsing import (
    REASONING_TAGS,
    parse_response,
    regions_from_token_ids,
    token_char_offsets,
    token_regions,
)
from care_megatron.rewards.regions import Region

RESPONSES = [
    "<think>Let me count: 3 + 4 = 7.</think>\n<answer>7</answer>",
    "<think>The bars are 3, 5 and 2 high; the tallest is B.</think> <answer>(B)</answer>",
    "<think>ü 你好世界 🙂 \\frac{1}{2}</think><answer>東京タワー</answer>",
    "<think>unclosed rationale that was truncated",
    "<answer>B</answer><think>answer before think</think>",
    "no tags at all, just text",
    "<think>a</think><answer>b<answer>nested</answer>c</answer> trailing",
    "<think>x</think><answer>9",
    "",
]


def reference_regions(offsets, parsed):
    """Per-character labels, then each token takes the strongest label among its characters."""
    labels = [Region.OTHER] * len(parsed.text)
    for span, code in ((parsed.think_span, Region.THINK), (parsed.answer_span, Region.ANSWER)):
        if span:
            for i in range(*span):
                labels[i] = max(labels[i], code)
    return [int(max((labels[i] for i in range(s, e)), default=Region.OTHER)) for s, e in offsets]


def test_tags_split_across_qwen_tokens(qwen_tokenizer):
    text = RESPONSES[0]
    enc = qwen_tokenizer.encode(text)
    assert "<think>" not in enc.tokens and "<answer>" not in enc.tokens
    assert enc.tokens[:3] == ["<th", "ink", ">"]
    regions = token_regions(enc.offsets, parse_response(text))
    # 18 tokens up to and including ">\n" (holds the '>' of </think>) are THINK, then the answer.
    assert regions.tolist() == [Region.THINK] * 18 + [Region.ANSWER] * 7
    assert regions.dtype == torch.long


@pytest.mark.parametrize("text", RESPONSES)
def test_qwen_regions_match_character_reference(qwen_tokenizer, text):
    parsed = parse_response(text)
    enc = qwen_tokenizer.encode(text)
    got = token_regions(enc.offsets, parsed)
    assert got.tolist() == reference_regions(enc.offsets, parsed)
    assert got.shape == (len(enc.ids),)
    if parsed.answer_span is None:
        assert not (got == Region.ANSWER).any()
    if parsed.think_span is None:
        assert not (got == Region.THINK).any()


def test_chat_template_tokens_are_other(qwen_tokenizer):
    text = RESPONSES[1] + "<|im_end|>"
    enc = qwen_tokenizer.encode(text)
    assert enc.tokens[-1] == "<|im_end|>"
    regions = token_regions(torch.tensor(enc.offsets), parse_response(text))
    assert regions[-1] == Region.OTHER
    assert (regions[:-1] != Region.OTHER).all()  # nothing but one space outside the spans


def test_reasoning_tags(qwen_tokenizer):
    text = "<reasoning>area = 12</reasoning><answer>12</answer>"
    parsed = parse_response(text, REASONING_TAGS)
    enc = qwen_tokenizer.encode(text)
    regions = token_regions(enc.offsets, parsed)
    assert regions.tolist() == reference_regions(enc.offsets, parsed)
    assert set(regions.tolist()) == {Region.THINK, Region.ANSWER}


@pytest.fixture(scope="module")
def tiny_bpe():
    """A BPE trained here on a small corpus; ``<think>`` is not a token, so it always splits."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "the answer is seven because three plus four is seven",
        "think about the tallest bar and count the shapes",
        "<thought> answers </thought> and <ans> tags",
    ] * 20
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return tok


@pytest.mark.parametrize("text", RESPONSES)
def test_tiny_bpe_regions(tiny_bpe, text):
    enc = tiny_bpe.encode(text)
    if text:
        assert "<think>" not in enc.tokens and "Ġ<think>" not in enc.tokens
    parsed = parse_response(text)
    assert token_regions(enc.offsets, parsed).tolist() == reference_regions(enc.offsets, parsed)


def test_tiny_bpe_tag_split_exact(tiny_bpe):
    text = "<think>seven</think><answer>7</answer>"
    enc = tiny_bpe.encode(text)
    tag_tokens = [t for t, (s, e) in zip(enc.tokens, enc.offsets) if e <= len("<think>")]
    assert len(tag_tokens) >= 2  # the tag really is split
    regions = token_regions(enc.offsets, parse_response(text)).tolist()
    boundary = len("<think>seven</think>")
    expected = [Region.THINK if e <= boundary else Region.ANSWER for s, e in enc.offsets]
    assert regions == expected


def test_straddling_token_goes_to_answer():
    parsed = parse_response("<think>a</think><answer>b</answer>")
    # one token covering "k>" of </think> and "<a" of <answer>
    regions = token_regions([(0, 14), (14, 18), (18, 34)], parsed)
    assert regions.tolist() == [Region.THINK, Region.ANSWER, Region.ANSWER]


def test_empty_and_degenerate_offsets():
    parsed = parse_response("<think>a</think><answer>b</answer>")
    assert token_regions([], parsed).shape == (0,)
    assert token_regions([(0, 0), (5, 5)], parsed).tolist() == [Region.OTHER, Region.OTHER]
    with pytest.raises(ValueError, match="offsets"):
        token_regions([1, 2, 3], parsed)


@pytest.mark.parametrize("text", RESPONSES + ["<|im_start|>assistant\n" + RESPONSES[2] + "<|im_end|>"])
def test_token_char_offsets_match_encoder_offsets(qwen_tokenizer, text):
    enc = qwen_tokenizer.encode(text)
    assert qwen_tokenizer.decode(enc.ids, skip_special_tokens=False) == text
    assert token_char_offsets(enc.ids, qwen_tokenizer) == [tuple(o) for o in enc.offsets]


def test_token_char_offsets_on_multibyte_split(qwen_tokenizer):
    # A rare CJK character is split into byte tokens; both pieces span that one character.
    text = "<think>𠮷</think><answer>𠮷</answer>"
    enc = qwen_tokenizer.encode(text)
    offsets = token_char_offsets(enc.ids, qwen_tokenizer)
    assert offsets == [tuple(o) for o in enc.offsets]
    regions = token_regions(offsets, parse_response(text))
    assert regions.tolist() == reference_regions(offsets, parse_response(text))


@pytest.mark.parametrize("text", RESPONSES)
def test_regions_from_token_ids_matches_offsets_path(qwen_tokenizer, text):
    enc = qwen_tokenizer.encode(text + "<|im_end|>")
    regions, parsed = regions_from_token_ids(enc.ids, qwen_tokenizer)
    assert parsed.text == text + "<|im_end|>"
    expected = token_regions(enc.offsets, parse_response(parsed.text)).tolist()
    expected[-1] = Region.OTHER  # <|im_end|> is a template token even inside an unclosed rationale
    assert regions.tolist() == expected


def test_regions_from_token_ids_truncated_multibyte(qwen_tokenizer):
    # Generation stopped in the middle of a character's bytes: no crash, the rest still maps.
    char = next(c for c in ("\U000F0000", "\U0010FFFD", "𓀀", "𠮷") if len(qwen_tokenizer.encode(c).ids) > 1)
    ids = qwen_tokenizer.encode("<think>" + char).ids
    regions, parsed = regions_from_token_ids(ids[:-1], qwen_tokenizer)
    assert parsed.text.startswith("<think>") and parsed.text.endswith("\ufffd")
    assert regions.tolist() == [Region.THINK] * (len(ids) - 1)


@pytest.mark.parametrize("name", ["tiny", "qwen"])
def test_project_tokenizers(name):
    """The tokenizers the trainer loads (transformers fast tokenizers): offsets from ids equal the
    encoder's offset mapping, and regions from ids equal regions from offsets."""
    tokenizer_module = pytest.importorskip("care_megatron.models.tokenizer")
    try:
        tok = tokenizer_module.load_tokenizer(name)
    except Exception as exc:  # asset or optional package missing in this checkout
        pytest.skip(f"tokenizer {name!r} unavailable: {exc}")
    text = "<think>count: 3 + 4 = 7 üñí 你好</think>\n<answer>7</answer>"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    assert token_char_offsets(enc["input_ids"], tok) == offsets
    regions, parsed = regions_from_token_ids(enc["input_ids"], tok)
    assert parsed.text == text
    assert regions.tolist() == reference_regions(offsets, parse_response(text))
    assert regions[0] == Region.THINK and regions[-1] == Region.ANSWER
