"""Model registry: tiny configs (closed-form sizes, TP-2 divisibility), seeded init, local checkpoints, generate."""
import json

import pytest
import torch
from PIL import Image

from care_megatron.config.schema import ModelConfig
from care_megatron.data.prompting import GENERATION_FORBIDDEN_TOKENS, build_prompt, generation_suppressed_token_ids
from care_megatron.models import MODEL_REGISTRY, build_hf_config, build_model_and_processor, count_parameters

TINY = [("tiny_qwen2_5_vl", "qwen2_5_vl"), ("tiny_qwen3_vl", "qwen3_vl")]


def language_parameters(arch, vocab=1024, hidden=128, layers=4, heads=4, kv_heads=2, head_dim=32, ffn=256):
    """Closed-form parameter count of the text decoder + embeddings + untied LM head."""
    q, kv = heads * head_dim, kv_heads * head_dim
    attention = hidden * q + 2 * hidden * kv + q * hidden
    if arch == "qwen2_5_vl":
        attention += q + 2 * kv  # q/k/v biases
    else:
        attention += 2 * head_dim  # Qwen3 q_norm / k_norm
    layer = attention + 3 * hidden * ffn + 2 * hidden
    return layers * layer + hidden + 2 * vocab * hidden


@pytest.mark.parametrize("name,arch", TINY)
def test_tiny_config_shapes(name, arch):
    config = build_hf_config(name)
    text, vision = config.get_text_config(), config.vision_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    assert text.vocab_size == 1024 and head_dim == 32
    assert text.num_attention_heads % 2 == 0 and text.num_key_value_heads % 2 == 0  # Megatron TP=2
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert vision.spatial_merge_size == 2 and vision.temporal_patch_size == 2 and vision.depth == 2
    assert vision.out_hidden_size == text.hidden_size
    assert vision.patch_size == (14 if arch == "qwen2_5_vl" else 16)
    if arch == "qwen3_vl":
        assert max(vision.deepstack_visual_indexes) < vision.depth
        assert text.rope_parameters["mrope_interleaved"] is True


@pytest.mark.parametrize("name,arch", TINY)
def test_build_sizes_seeding_and_rng_isolation(name, arch):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    model, tokenizer, processor = build_model_and_processor(ModelConfig(name=name, arch=arch, init_seed=5))
    assert torch.equal(torch.rand(3), expected_next)  # building did not consume the caller's RNG
    counts = count_parameters(model)
    assert counts["language"] == language_parameters(arch)
    assert 0 < counts["vision"] < counts["language"]
    again, _, _ = build_model_and_processor(ModelConfig(name=name, arch=arch, init_seed=5))
    other, _, _ = build_model_and_processor(ModelConfig(name=name, arch=arch, init_seed=6))
    state, state_again, state_other = model.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(state[k], state_again[k]) for k in state)
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(state[key], state_other[key])
    assert processor.patch_size == model.config.vision_config.patch_size and processor.merge_size == 2
    assert model.generation_config.eos_token_id == [tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                                    tokenizer.convert_tokens_to_ids("<|endoftext|>")]


def test_local_directory_round_trip(tmp_path):
    model, tokenizer, processor = build_model_and_processor(ModelConfig(init_seed=3), min_pixels=56 * 56, max_pixels=56 * 56)
    model.save_pretrained(tmp_path)
    loaded, _, _ = build_model_and_processor(ModelConfig(name=str(tmp_path)))
    prompt = build_prompt("How many?", [Image.new("RGB", (56, 56), "red")], tokenizer, processor)
    ids = torch.tensor([prompt.prompt_ids])
    kwargs = dict(input_ids=ids, pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw,
                  mm_token_type_ids=(ids == model.config.image_token_id).int())
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(**kwargs).logits, loaded(**kwargs).logits)
    with pytest.raises(ValueError, match="model.arch"):
        build_model_and_processor(ModelConfig(name=str(tmp_path), arch="qwen3_vl"))
    # a checkpoint's own preprocessor settings are honoured unless the caller overrides the pixel bounds
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 112 * 112, "longest_edge": 112 * 112}, "image_mean": [0.5, 0.5, 0.5],
         "image_std": [0.25, 0.25, 0.25]}))
    _, _, saved = build_model_and_processor(ModelConfig(name=str(tmp_path)))
    grid = build_prompt("Q", [Image.new("RGB", (56, 56))], tokenizer, saved).image_grid_thw
    assert grid.tolist() == [[1, 8, 8]] and list(saved.image_std) == [0.25, 0.25, 0.25]
    _, _, override = build_model_and_processor(ModelConfig(name=str(tmp_path)), min_pixels=56 * 56, max_pixels=56 * 56)
    assert build_prompt("Q", [Image.new("RGB", (56, 56))], tokenizer, override).image_grid_thw.tolist() == [[1, 4, 4]]


def test_bad_names_and_mismatches():
    with pytest.raises(ValueError, match="tiny_qwen2_5_vl, tiny_qwen3_vl"):
        build_model_and_processor(ModelConfig(name="no_such_model"))
    with pytest.raises(ValueError, match="model.arch"):
        build_model_and_processor(ModelConfig(name="tiny_qwen3_vl", arch="qwen2_5_vl"))
    assert set(MODEL_REGISTRY) == {"tiny_qwen2_5_vl", "tiny_qwen3_vl"}


@pytest.mark.parametrize("name,arch,pixels", [("tiny_qwen2_5_vl", "qwen2_5_vl", 56 * 56), ("tiny_qwen3_vl", "qwen3_vl", 64 * 64)])
def test_generate_with_images(name, arch, pixels):
    model, tokenizer, processor = build_model_and_processor(ModelConfig(name=name, arch=arch), min_pixels=pixels,
                                                            max_pixels=pixels)
    model.eval()
    prompt = build_prompt("What colour is the shape?", [Image.new("RGB", (56, 56), "blue")], tokenizer, processor)
    ids = torch.tensor([prompt.prompt_ids] * 2)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             pixel_values=torch.cat([prompt.pixel_values] * 2),
                             image_grid_thw=torch.cat([prompt.image_grid_thw] * 2),
                             mm_token_type_ids=(ids == model.config.image_token_id).int(),
                             max_new_tokens=6, do_sample=False)
    assert out.shape[0] == 2 and 1 <= out.shape[1] - ids.shape[1] <= 6
    assert torch.equal(out[0], out[1])  # same prompt, greedy: identical continuations
    assert torch.equal(out[:, : ids.shape[1]], ids)


def test_sampling_with_suppressed_tokens_never_emits_image_tokens():
    model, tokenizer, processor = build_model_and_processor(ModelConfig(init_seed=1), min_pixels=56 * 56,
                                                            max_pixels=56 * 56)
    model.eval()
    forbidden = generation_suppressed_token_ids(tokenizer)
    assert len(forbidden) == len(GENERATION_FORBIDDEN_TOKENS)
    assert model.config.image_token_id in forbidden and model.config.vision_start_token_id in forbidden
    prompt = build_prompt("Count.", [Image.new("RGB", (56, 56), "red")], tokenizer, processor)
    ids = torch.tensor([prompt.prompt_ids] * 8)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             pixel_values=torch.cat([prompt.pixel_values] * 8),
                             image_grid_thw=torch.cat([prompt.image_grid_thw] * 8),
                             mm_token_type_ids=(ids == model.config.image_token_id).int(), max_new_tokens=48,
                             min_new_tokens=48, do_sample=True, top_k=0, suppress_tokens=forbidden)
    responses = out[:, ids.shape[1]:]
    assert responses.shape == (8, 48)
    assert not torch.isin(responses, torch.tensor(forbidden)).any()
