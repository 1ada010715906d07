"""tools/gpu_rl_step.py builds the Qwen2.5-VL-3B shape (checked on the meta device, no weights)."""
import importlib.util
import os

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_registered_3b_shape_matches_the_released_dimensions():
    spec = importlib.util.spec_from_file_location("gpu_rl_step_under_test", os.path.join(REPO, "tools", "gpu_rl_step.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    from transformers import Qwen2_5_VLForConditionalGeneration

    from care_megatron.models import registry
    from care_megatron.models.tokenizer import load_tokenizer

    tool.register_3b_model()
    try:
        config = registry.build_hf_config(tool.MODEL_NAME, load_tokenizer("tiny"))
        with torch.device("meta"):
            model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        registry.MODEL_REGISTRY.pop(tool.MODEL_NAME)
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size) == (2048, 36, 16, 2, 11008, 151936)
    assert len(text.layer_types) == 36 and text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (vision.depth, vision.hidden_size, vision.out_hidden_size) == (32, 1280, 2048)
    decoder = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and "visual" not in n)
    per_layer = 2 * 2048 * 2048 + 2 * 2048 * 256 + 2048 + 2 * 256 + 3 * 2048 * 11008 + 2 * 2048
    assert decoder == 36 * per_layer
