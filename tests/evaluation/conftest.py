"""Shared fixtures of the evaluation tests: the tiny tokenizer and a 56 x 56 Qwen2.5-VL image processor."""
import pytest

from care_megatron.data.prompting import build_image_processor
from care_megatron.models import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def image_processor():
    return build_image_processor("qwen2_5_vl", min_pixels=56 * 56, max_pixels=56 * 56)
