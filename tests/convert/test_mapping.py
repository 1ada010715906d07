"""Pure state-dict conversion: exact round trips, layouts against hand-built expectations, errors."""
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from care_megatron.models.weight_mapping import (get_mapping, hf_to_megatron_state_dicts, layer_placement, mapping_for_config,
                                            megatron_to_hf_state_dict, padded_vocab_size)
from care_megatron.models.weight_mapping.rules import LanguageModelDims, fuse_qkv, split_qkv
from conftest import ARCH_VARIANTS
from tiny_models import build_model


def _load_dir(directory):
    return AutoConfig.from_pretrained(directory), load_file(f"{directory}/model.safetensors")


@pytest.mark.parametrize("arch,tie", ARCH_VARIANTS)
@pytest.mark.parametrize("tp,pp,vp", [(1, 1, None), (2, 1, None), (1, 2, None), (2, 2, None), (1, 2, 2)])
def test_round_trip_is_bit_exact(saved_model_dirs, arch, tie, tp, pp, vp):
    config, hf = _load_dir(saved_model_dirs(arch, tie))
    shards = hf_to_megatron_state_dicts(hf, config, tp=tp, pp=pp, vp=vp)
    assert len(shards) == tp * pp * (vp or 1)
    back = megatron_to_hf_state_dict(shards, config)
    assert sorted(back) == sorted(hf)
    for name, tensor in hf.items():
        assert torch.equal(back[name], tensor), name


@pytest.mark.parametrize("naming", ["local", "te"])
def test_layernorm_naming_flavours(saved_model_dirs, naming):
    config, hf = _load_dir(saved_model_dirs("qwen3", False))
    shards = hf_to_megatron_state_dicts(hf, config, tp=1, pp=1, layernorm_naming=naming)
    names = set(shards[(0, 0)])
    local = {"decoder.layers.0.input_layernorm.weight", "decoder.layers.0.pre_mlp_layernorm.weight"}
    te = {"decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
          "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"}
    assert (local if naming == "local" else te) <= names
    assert not ((te if naming == "local" else local) & names)
    input_norm = ("decoder.layers.0.input_layernorm.weight" if naming == "local"
                  else "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight")
    assert torch.equal(shards[(0, 0)][input_norm], hf["model.layers.0.input_layernorm.weight"])
    back = megatron_to_hf_state_dict(shards, config)
    assert all(torch.equal(back[k], v) for k, v in hf.items())


def test_qkv_layout_matches_megatron_group_order():
    """Hand-built: 4 query heads, 2 groups, head_dim 1 -> per group [q, q, k, v]."""
    dims = LanguageModelDims(num_layers=1, hidden_size=4, num_attention_heads=4, num_key_value_heads=2, head_dim=1,
                             ffn_hidden_size=4, vocab_size=8, tie_word_embeddings=False, qkv_bias=True,
                             qk_layernorm=False)
    q = torch.tensor([10.0, 11.0, 12.0, 13.0])
    k = torch.tensor([20.0, 21.0])
    v = torch.tensor([30.0, 31.0])
    fused = fuse_qkv(q, k, v, dims)
    assert fused.tolist() == [10.0, 11.0, 20.0, 30.0, 12.0, 13.0, 21.0, 31.0]
    assert [t.tolist() for t in split_qkv(fused[4:], dims)] == [[12.0, 13.0], [21.0], [31.0]]


def test_tp_shards_layout(saved_model_dirs):
    config, hf = _load_dir(saved_model_dirs("qwen2_5_vl", False))
    shards = hf_to_megatron_state_dicts(hf, config, tp=2, pp=1)
    r0, r1 = shards[(0, 0)], shards[(0, 1)]
    gate, up = hf["model.layers.1.mlp.gate_proj.weight"], hf["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(r1["decoder.layers.1.mlp.linear_fc1.weight"], torch.cat([gate[64:], up[64:]]))
    o = hf["model.layers.1.self_attn.o_proj.weight"]
    assert torch.equal(r0["decoder.layers.1.self_attention.linear_proj.weight"], o[:, :32])
    # rank 1 holds KV group 1: query heads 2, 3 then key head 1 then value head 1 (head_dim 16)
    qkv1 = r1["decoder.layers.1.self_attention.linear_qkv.weight"]
    assert torch.equal(qkv1[:32], hf["model.layers.1.self_attn.q_proj.weight"][32:])
    assert torch.equal(qkv1[32:48], hf["model.layers.1.self_attn.k_proj.weight"][16:])
    assert torch.equal(qkv1[48:], hf["model.layers.1.self_attn.v_proj.weight"][16:])
    emb = r1["embedding.word_embeddings.weight"]
    assert padded_vocab_size(300, 2) == 512 and emb.shape == (256, 64)
    assert torch.equal(emb[:300 - 256], hf["model.embed_tokens.weight"][256:]) and not emb[300 - 256:].any()
    assert torch.equal(r0["vision_model.blocks.0.attn.qkv.weight"], hf["visual.blocks.0.attn.qkv.weight"])
    assert torch.equal(r1["vision_model.merger.mlp.0.weight"], hf["visual.merger.mlp.0.weight"])


def test_pipeline_placement_and_tied_output(saved_model_dirs):
    config, hf = _load_dir(saved_model_dirs("qwen2_5_vl", True))
    assert "lm_head.weight" not in hf
    single = hf_to_megatron_state_dicts(hf, config, tp=1, pp=1)
    assert "output_layer.weight" not in single[(0, 0)]
    shards = hf_to_megatron_state_dicts(hf, config, tp=1, pp=2)
    first, last = shards[(0, 0)], shards[(1, 0)]
    assert not any(k.startswith("vision_model.") for k in last)
    assert "decoder.layers.2.mlp.linear_fc2.weight" not in first
    assert torch.equal(last["decoder.layers.0.mlp.linear_fc2.weight"], hf["model.layers.2.mlp.down_proj.weight"])
    assert torch.equal(last["output_layer.weight"], first["embedding.word_embeddings.weight"])
    assert "decoder.final_layernorm.weight" in last and "embedding.word_embeddings.weight" not in last


def test_layer_placement_interleaved():
    assert layer_placement(8, 2, 2) == {(0, 0): [0, 1], (1, 0): [2, 3], (0, 1): [4, 5], (1, 1): [6, 7]}
    assert layer_placement(7, 3) == {(0, 0): [0, 1], (1, 0): [2, 3], (2, 0): [4, 5, 6]}
    assert layer_placement(6, 2, first_stage_layers=2) == {(0, 0): [0, 1], (1, 0): [2, 3, 4, 5]}
    with pytest.raises(ValueError, match="cannot place"):
        layer_placement(3, 4)


def test_layer_placement_agrees_with_megatron_backend():
    backend = pytest.importorskip("care_megatron.training.megatron.parallel_state")
    for layers, pp, vp, first, last in [(8, 2, 2, None, None), (7, 3, None, None, None), (28, 4, None, 6, 6),
                                        (10, 2, None, 4, None)]:
        counts = backend.layers_per_pipeline_stage(layers, pp, vp, first, last)
        placement = layer_placement(layers, pp, vp, first_stage_layers=first, last_stage_layers=last)
        for pp_rank in range(pp):
            for vp_stage in range(vp or 1):
                offset = backend.stage_layer_offset(counts, pp_rank, pp, vp_stage)
                assert placement[(pp_rank, vp_stage)][:1] in ([offset], [])


def test_in_memory_names_are_accepted():
    model = build_model("qwen2_5_vl")
    state = model.state_dict()
    assert any(k.startswith("model.language_model.") for k in state)
    back = megatron_to_hf_state_dict(hf_to_megatron_state_dicts(state, model.config, tp=2, pp=2), model.config)
    assert torch.equal(back["visual.merger.mlp.2.weight"], state["model.visual.merger.mlp.2.weight"])
    assert torch.equal(back["model.layers.3.self_attn.q_proj.bias"],
                       state["model.language_model.layers.3.self_attn.q_proj.bias"])


def test_clear_errors(saved_model_dirs):
    config, hf = _load_dir(saved_model_dirs("qwen3", False))
    with pytest.raises(ValueError, match="unsupported architecture"):
        mapping_for_config(type("C", (), {"architectures": ["LlamaForCausalLM"], "model_type": "llama"})())
    with pytest.raises(ValueError, match="unknown architecture"):
        get_mapping("llama")
    with pytest.raises(ValueError, match="tp=4 must divide num_key_value_heads"):
        hf_to_megatron_state_dicts(hf, config, tp=4)
    missing = {k: v for k, v in hf.items() if "layers.3.self_attn.k_norm" not in k}
    with pytest.raises(ValueError, match="missing"):
        hf_to_megatron_state_dicts(missing, config)
    wrong = AutoConfig.from_pretrained(saved_model_dirs("qwen3", False))
    wrong.num_hidden_layers = 3
    with pytest.raises(ValueError, match="not covered"):
        hf_to_megatron_state_dicts(hf, wrong)
    wrong = AutoConfig.from_pretrained(saved_model_dirs("qwen3", False))
    wrong.intermediate_size = 96
    with pytest.raises(ValueError, match="mismatched config"):
        hf_to_megatron_state_dicts(hf, wrong)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "qwen2_5_vl", "qwen3_vl"])
def test_per_architecture_adapters(saved_model_dirs, arch):
    """Each mapping module's hf_to_megatron (one rank, backend prefixes) / megatron_to_hf agree with the
    whole-model functions."""
    import importlib

    module = importlib.import_module(f"checkpoints_convert.{arch}")
    config, hf = _load_dir(saved_model_dirs(arch, False))
    full = hf_to_megatron_state_dicts(hf, config, tp=2, pp=2)
    for pp_rank in range(2):
        for tp_rank in range(2):
            rank = module.hf_to_megatron(hf, config, 2, tp_rank, None, pp_size=2, pp_rank=pp_rank)
            stripped = {k.split("language_model.", 1)[-1] if k.startswith("language_model.") else k[len("vision."):]: v
                        for k, v in rank.items()}
            assert sorted(stripped) == sorted(full[(pp_rank, tp_rank)])
            assert all(torch.equal(v, full[(pp_rank, tp_rank)][k]) for k, v in stripped.items())
    back = module.megatron_to_hf(full, config)
    assert all(torch.equal(back[k], v) for k, v in hf.items())
