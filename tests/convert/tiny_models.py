"""Tiny random models of the four converted architectures, saved with ``save_pretrained``."""
from __future__ import annotations

import os

import torch

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, max_position_embeddings=256)

# Token ids of the VLM special tokens inside the tiny vocabulary.
IMAGE_TOKEN_ID, VISION_START_ID, VISION_END_ID, VIDEO_TOKEN_ID = 290, 291, 292, 293


def build_model(arch: str, tie: bool = False, seed: int = 0):
    """A tiny random ``arch`` model (float32, eval mode) with every weight non-trivially random."""
    import transformers as tf

    torch.manual_seed(seed)
    special = dict(image_token_id=IMAGE_TOKEN_ID, vision_start_token_id=VISION_START_ID,
                   vision_end_token_id=VISION_END_ID, video_token_id=VIDEO_TOKEN_ID)
    if arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**TEXT, tie_word_embeddings=tie))
    elif arch == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**TEXT, head_dim=16, tie_word_embeddings=tie))
    elif arch == "qwen2_5_vl":
        config = tf.Qwen2_5_VLConfig(
            text_config=dict(**TEXT, tie_word_embeddings=tie, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                               fullatt_block_indexes=[1], window_size=56, patch_size=14),
            tie_word_embeddings=tie, **special)
        model = tf.Qwen2_5_VLForConditionalGeneration(config)
    elif arch == "qwen3_vl":
        config = tf.Qwen3VLConfig(
            text_config=dict(**TEXT, head_dim=16, tie_word_embeddings=tie,
                             rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True}),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                               deepstack_visual_indexes=[0, 1], num_position_embeddings=64, patch_size=16),
            tie_word_embeddings=tie, **special)
        model = tf.Qwen3VLForConditionalGeneration(config)
    else:
        raise ValueError(arch)
    # Default init leaves norms at exactly 1 and biases at 0: randomise everything so a swapped or
    # dropped tensor cannot go unnoticed.
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.05 + (1.0 if param.ndim == 1 and (param == 1).all() else 0.0))
    return model.eval()


def save_model(arch: str, directory: str, tie: bool = False, seed: int = 0) -> str:
    model = build_model(arch, tie=tie, seed=seed)
    model.save_pretrained(directory)
    return directory


def vlm_inputs(model, seed: int = 0) -> dict:
    """One image + text prompt for a tiny VLM: random pixel patches and a matching number of image tokens."""
    generator = torch.Generator().manual_seed(seed)
    vision = model.config.vision_config
    grid_t, grid_h, grid_w = 1, 4, 4
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    pixel_values = torch.randn(grid_t * grid_h * grid_w, patch_dim, generator=generator)
    n_image_tokens = grid_t * grid_h * grid_w // vision.spatial_merge_size ** 2
    text = torch.randint(0, 280, (10,), generator=generator)
    input_ids = torch.cat([text[:4], torch.tensor([VISION_START_ID]), torch.full((n_image_tokens,), IMAGE_TOKEN_ID),
                           torch.tensor([VISION_END_ID]), text[4:]])[None]
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixel_values,
                image_grid_thw=torch.tensor([[grid_t, grid_h, grid_w]]),
                mm_token_type_ids=(input_ids == IMAGE_TOKEN_ID).int())


def text_inputs(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 300, (2, 12), generator=generator)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))


def module_from_state_dict(state_dict) -> "torch.nn.Module":
    """An ``nn.Module`` tree whose ``named_parameters()`` are exactly ``state_dict`` (copies)."""
    root = torch.nn.Module()
    for name, tensor in state_dict.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(tensor.clone(), requires_grad=False))
    return root
