"""Helpers of the rollout tests (tiny random Qwen2.5-VL, word-level tokenizer, images, requests).

A uniquely named module (not conftest) so that test files of several folders can import their
own helpers in one pytest session."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>", "<think>", "</think>", "<answer>", "</answer>", "<pad>"]
WORDS = ["user", "assistant", "what", "is", "the", "how", "many", "shapes", "red", "blue", "bar",
         "tallest", "count", "angle", "answer", "so", "=", "+", "-", "."] + [str(d) for d in range(10)]
WORDS += [w for w in ("your previous reasoning was incorrect identify failing operation correct it and "
                      "re-derive necessary quantities keep this section concise do not restate question").split()
          if w not in WORDS]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS + ["<unk>"])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                  pre_tokenizers.Punctuation("isolated")])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                  eos_token="<|im_end|>", additional_special_tokens=SPECIALS[:-1])
    return tok


def build_model(tokenizer, seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
                         bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<pad>")),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    # Random init gives near-uniform logits; a larger lm_head spread makes greedy argmaxes robust
    # to float reassociation, so "identical tokens" tests test logic, not rounding luck.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


def make_image(seed: int, size: int = 56) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8"))


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def image_processor():
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56)


@pytest.fixture()
def model(tokenizer):
    return build_model(tokenizer, seed=0)


def make_request(tokenizer, image_processor, request_id: str, words: str, images: list | None = None,
                 prefix: str = ""):
    """A chat-templated request whose image placeholders are expanded like the Qwen processor does."""
    from care_megatron.rollout.base import GenerationRequest

    images = images or []
    pixel_values = grid = None
    text = "<|im_start|> user "
    ids = [tokenizer.convert_tokens_to_ids("<|im_start|>"), tokenizer.convert_tokens_to_ids("user")]
    if images:
        out = image_processor(images=images, return_tensors="pt")
        pixel_values, grid = out["pixel_values"], out["image_grid_thw"]
        for thw in grid:
            n = int(thw.prod()) // 4
            ids += tokenizer.convert_tokens_to_ids(["<|vision_start|>"] + ["<|image_pad|>"] * n + ["<|vision_end|>"])
            text += "<|vision_start|><|image_pad|><|vision_end|> "
    ids += tokenizer.encode(words, add_special_tokens=False)
    ids += tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>", "assistant"])
    text += words + " <|im_end|> <|im_start|> assistant "
    prefix_ids = tokenizer.encode(prefix, add_special_tokens=False) if prefix else []
    return GenerationRequest(request_id=request_id, prompt_ids=ids, prompt_text=text, images=images,
                             pixel_values=pixel_values, image_grid_thw=grid, prefix_ids=prefix_ids)
