"""Model registry: tiny random Qwen-VL models for the CPU default and tests, or a local HF checkpoint.

``build_model_and_processor(model_config)`` returns ``(model, tokenizer, image_processor)`` for
``care_megatron.config.schema.ModelConfig``:

* ``model.name`` a registry name (``tiny_qwen2_5_vl``, ``tiny_qwen3_vl``): the transformers
  ``Qwen2_5_VLForConditionalGeneration`` / ``Qwen3VLForConditionalGeneration`` class built from
  :func:`build_hf_config` with random weights drawn under ``model.init_seed`` (the global RNG is
  left untouched), vocabulary = the tokenizer's size.
* ``model.name`` a local directory: ``from_pretrained`` (released Qwen2.5-VL / Qwen3-VL weights,
  or a directory this package exported).

The tiny sizes keep the embedded default (SFT + RL with G=8 rollouts of <= 64 tokens) at minutes on
two CPU cores, while keeping every structural feature the full models have and the Megatron path
must reproduce: GQA (4 query / 2 KV heads, both divisible by TP=2), SwiGLU, M-RoPE with
``mrope_section`` summing to ``head_dim / 2``, window + full attention blocks (Qwen2.5-VL) or
deepstack features (Qwen3-VL) in a 2-block vision tower, 2x2 spatial merge.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Callable

import torch

from care_megatron.data.prompting import (
    END_OF_TEXT, IM_END, IM_START, PromptTokenIds, build_image_processor,
)
from care_megatron.models.tokenizer import load_tokenizer

TINY_TEXT = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    initializer_range=0.02,
)
"""Text decoder of the tiny models: 4 x (GQA 4/2 heads of 32, SwiGLU 256), hidden 128."""

TINY_MROPE_SECTION = [4, 6, 6]
"""t / h / w rotary frequency pairs; sums to head_dim / 2 = 16 (the released models use 16/24/24 of 64)."""

TINY_VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, in_channels=3,
                   spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.02)
"""Vision tower of the tiny models: 2 blocks of width 64, 2 heads, 2x2 merge into the text width."""


def _qwen2_5_vl_config(vocab_size: int, token_ids: dict[str, int]):
    from transformers import Qwen2_5_VLConfig

    text = dict(TINY_TEXT, vocab_size=vocab_size, hidden_act="silu", tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": list(TINY_MROPE_SECTION)},
                bos_token_id=None, eos_token_id=token_ids["eos"], pad_token_id=token_ids["pad"])
    text.pop("head_dim")  # Qwen2.5-VL derives head_dim = hidden / heads (= 32)
    vision = dict(TINY_VISION, patch_size=14, hidden_act="silu", out_hidden_size=TINY_TEXT["hidden_size"],
                  window_size=112, fullatt_block_indexes=[1], tokens_per_second=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=token_ids["image"],
                            video_token_id=token_ids["video"], vision_start_token_id=token_ids["vision_start"],
                            vision_end_token_id=token_ids["vision_end"], tie_word_embeddings=False)


def _qwen3_vl_config(vocab_size: int, token_ids: dict[str, int]):
    from transformers import Qwen3VLConfig

    text = dict(TINY_TEXT, vocab_size=vocab_size, hidden_act="silu",
                rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                 "mrope_section": list(TINY_MROPE_SECTION), "mrope_interleaved": True},
                pad_token_id=token_ids["pad"])
    # deepstack: features after vision block 0 and 1 are added to the first two decoder layers'
    # hidden states at the image positions (the released 8B model taps blocks 8/16/24 of 27).
    vision = dict(TINY_VISION, patch_size=16, hidden_act="gelu_pytorch_tanh", out_hidden_size=TINY_TEXT["hidden_size"],
                  num_position_embeddings=256, deepstack_visual_indexes=[0, 1])
    return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=token_ids["image"],
                         video_token_id=token_ids["video"], vision_start_token_id=token_ids["vision_start"],
                         vision_end_token_id=token_ids["vision_end"], tie_word_embeddings=False)


MODEL_REGISTRY: dict[str, dict[str, Any]] = {
    "tiny_qwen2_5_vl": {"arch": "qwen2_5_vl", "config": _qwen2_5_vl_config},
    "tiny_qwen3_vl": {"arch": "qwen3_vl", "config": _qwen3_vl_config},
}
"""Registry names -> architecture family and HF config factory ``(vocab_size, token_ids) -> config``."""


def _token_ids(tokenizer) -> dict[str, int]:
    ids = PromptTokenIds.from_tokenizer(tokenizer)
    video = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    return {"image": ids.image_token_id, "video": int(video), "vision_start": ids.vision_start_token_id,
            "vision_end": ids.vision_end_token_id, "eos": ids.im_end_token_id, "pad": ids.pad_token_id}


def model_class(arch: str):
    """The transformers class of an architecture family."""
    import transformers

    classes = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration"}
    if arch not in classes:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(classes)}")
    return getattr(transformers, classes[arch])


def build_hf_config(name: str, tokenizer: Any = "tiny"):
    """HF config of registry model ``name`` (``tiny_qwen2_5_vl`` | ``tiny_qwen3_vl``), or of a local directory.

    ``tokenizer``: a tokenizer object or a name for :func:`load_tokenizer`; it fixes the vocabulary
    size and the image / vision-start / end-of-turn token ids of registry models.
    """
    if name in MODEL_REGISTRY:
        tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        return MODEL_REGISTRY[name]["config"](len(tok), _token_ids(tok))
    if os.path.isdir(name):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(name)
    raise ValueError(f"unknown model {name!r}: use one of {', '.join(MODEL_REGISTRY)} or a local HF directory")


def arch_of(hf_config) -> str:
    """``qwen2_5_vl`` or ``qwen3_vl`` from an HF config's ``model_type``."""
    model_type = getattr(hf_config, "model_type", "")
    if model_type in ("qwen2_5_vl", "qwen3_vl"):
        return model_type
    raise ValueError(f"unsupported model_type {model_type!r}: care_megatron supports qwen2_5_vl and qwen3_vl")


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model_and_processor(model_config, device: str | torch.device = "cpu", min_pixels: int | None = None,
                              max_pixels: int | None = None):
    """``(model, tokenizer, image_processor)`` for a :class:`care_megatron.config.schema.ModelConfig`.

    ``model``: a transformers ``Qwen2_5_VLForConditionalGeneration`` / ``Qwen3VLForConditionalGeneration``
    in ``model_config.dtype`` on ``device``, in train mode, with ``generation_config`` stopping at
    ``<|im_end|>`` / ``<|endoftext|>``. ``tokenizer``: :func:`load_tokenizer(model_config.tokenizer)`.
    ``image_processor``: ``Qwen2VLImageProcessorPil`` whose patch / merge sizes are the vision tower's,
    resizing to ``[min_pixels, max_pixels]`` (None: a checkpoint directory's ``preprocessor_config.json``
    value, else the architecture's released default; the embedded default passes ``data.min_pixels`` /
    ``data.max_pixels``), normalised with the directory's mean / std when it has them.
    Raises ValueError when the architecture disagrees with ``model_config.arch`` or the tokenizer
    does not fit the model (vocabulary larger than the embedding, different image token id).
    """
    tokenizer = load_tokenizer(model_config.tokenizer)
    dtype = _DTYPES[model_config.dtype]
    name = model_config.name
    if name in MODEL_REGISTRY:
        hf_config = build_hf_config(name, tokenizer)
        arch = MODEL_REGISTRY[name]["arch"]
        _check_arch(arch, model_config.arch, name)
        hf_config._attn_implementation = model_config.attn_implementation
        # Seeded init without disturbing the caller's RNG stream (data order, sampling).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model_config.init_seed)
            model = model_class(arch)(hf_config)
        model = model.to(dtype=dtype)
    elif os.path.isdir(name):
        hf_config = build_hf_config(name)
        arch = arch_of(hf_config)
        _check_arch(arch, model_config.arch, name)
        model = model_class(arch).from_pretrained(name, dtype=dtype, attn_implementation=model_config.attn_implementation)
    else:
        raise ValueError(f"config field 'model.name': unknown model {name!r}; valid: {', '.join(MODEL_REGISTRY)} "
                         "or a local Hugging Face directory")
    _check_tokenizer_fits(model.config, tokenizer, model_config)
    ids = PromptTokenIds.from_tokenizer(tokenizer)
    model.generation_config.eos_token_id = [ids.im_end_token_id, ids.pad_token_id]
    model.generation_config.pad_token_id = ids.pad_token_id
    model.generation_config.bos_token_id = None
    model.to(device)
    model.train()
    vision = model.config.vision_config
    saved = _saved_preprocessor_settings(name) if os.path.isdir(name) else {}
    image_processor = build_image_processor(
        arch,
        min_pixels=min_pixels if min_pixels is not None else saved.get("min_pixels"),
        max_pixels=max_pixels if max_pixels is not None else saved.get("max_pixels"),
        patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
        temporal_patch_size=vision.temporal_patch_size,
        image_mean=saved.get("image_mean"), image_std=saved.get("image_std"))
    return model, tokenizer, image_processor


def _saved_preprocessor_settings(directory: str) -> dict[str, Any]:
    """Resize bounds and normalisation of a checkpoint's ``preprocessor_config.json`` (empty if absent)."""
    import json

    path = os.path.join(directory, "preprocessor_config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as handle:
        raw = json.load(handle)
    size = raw.get("size") or {}
    out = {"min_pixels": raw.get("min_pixels", size.get("shortest_edge")),
           "max_pixels": raw.get("max_pixels", size.get("longest_edge")),
           "image_mean": raw.get("image_mean"), "image_std": raw.get("image_std")}
    return {k: v for k, v in out.items() if v is not None}


def _check_arch(arch: str, wanted: str, name: str) -> None:
    if arch != wanted:
        raise ValueError(f"config field 'model.arch': {name!r} is a {arch} model but model.arch={wanted!r}")


def _check_tokenizer_fits(hf_config, tokenizer, model_config) -> None:
    vocab = hf_config.get_text_config().vocab_size
    if len(tokenizer) > vocab:
        raise ValueError(f"config field 'model.tokenizer': {model_config.tokenizer!r} has {len(tokenizer)} tokens but "
                         f"the model's embedding has {vocab} rows; use the model's own tokenizer (model.tokenizer=<dir>)")
    image = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    if image != hf_config.image_token_id:
        raise ValueError(f"config field 'model.tokenizer': <|image_pad|> is {image} in the tokenizer but "
                         f"{hf_config.image_token_id} in the model config")


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts: ``total``, ``vision`` (tower + merger), ``language`` (decoder + embeddings + head)."""
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for n, p in model.named_parameters() if ".visual." in f".{n}")
    return {"total": total, "vision": vision, "language": total - vision}
