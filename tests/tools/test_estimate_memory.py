"""tools/estimate_memory.py / care_megatron.memory_plan: hand-computed bytes for one small shape,
parameter counts equal to transformers' models, and every example recipe fits an 80 GB GPU."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import care_megatron
from care_megatron.config import load_config
from care_megatron.memory_plan import GIB, KNOWN_SHAPES, ModelShape, plan_memory

REPO = Path(care_megatron.__file__).resolve().parent.parent
CONFIGS = REPO / "examples" / "configs"
# recipes/*-sft.yaml included: their plan is the RL phases' of the same layout, an upper bound for care-sft
# (no rollout engine, no reference model), so their micro_batch_tokens is checked to fit too
CLUSTER_CONFIGS = sorted((CONFIGS / "recipes").glob("*.yaml")) + sorted(CONFIGS.glob("qwen*.yaml"))

SMALL = ModelShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=100,
                   tied_embeddings=False, qkv_bias=True)
SMALL_CONFIG = ["parallel.backend=megatron", "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
                "parallel.use_distributed_optimizer=true", "parallel.recompute=selective", "model.dtype=bfloat16",
                "rollout.engine=sglang", "rollout.tensor_parallel_size=2", "rollout.mem_fraction_static=0.5",
                "rollout.weight_bucket_mb=1", "rollout.group_size=8", "rollout.max_new_tokens=100",
                "data.prompts_per_step=4", "train.micro_batch_tokens=1000", "algorithm.name=care"]


def _bytes(plan, phase):
    return {k: v * GIB for k, v in plan.phases[phase].items()}


def test_small_shape_matches_hand_computed_bytes():
    # parameters: per layer q 64*64 + k, v 2*64*32 + o 64*64 + biases 64 + 2*32 + MLP 3*64*128 + norms 2*64
    #   = 4096 + 4096 + 4096 + 128 + 24576 + 128 = 37120; 2 layers + embeddings 2*100*64 + final norm 64 = 87104
    assert SMALL.params() == 87104
    plan = plan_memory(load_config(None, SMALL_CONFIG), gpu_memory_gib=10, gpus=4, shape=SMALL, prompt_tokens=50,
                       trainer_overhead_gib=1.0, engine_overhead_gib=0.5)
    assert plan.parallel == {"tp": 2, "pp": 1, "cp": 1, "dp": 2, "rollout_tp": 2}
    train = _bytes(plan, "train")
    # TP=2 shard 43552 params: bf16 weights 87104 B, fp32 grads 174208 B, Adam 12 B/param over DP=2: 261312 B
    assert train["weights"] == pytest.approx(87104) and train["gradients"] == pytest.approx(174208)
    assert train["optimizer"] == pytest.approx(261312) and train["reference"] == pytest.approx(87104)  # KL 0.02
    # per token and layer: 2 B * (norm inputs 128 / 2 (SP) + (QKV 64+64 + attn 64 + MLP 3*128) / 2) = 704 B
    assert train["activations"] == pytest.approx(1000 * 2 * 704)
    assert train["logits"] == pytest.approx(1000 * 50 * 4)  # fp32, vocabulary shard 100 / 2
    assert train["trainer context"] == pytest.approx(GIB) and train["engine runtime"] == pytest.approx(GIB / 2)
    sync = _bytes(plan, "weight_sync")
    assert sync["trainer weights"] == pytest.approx(87104) and sync["engine weights"] == pytest.approx(87104)
    assert sync["transfer buckets"] == pytest.approx(2 * 2 ** 20)
    assert _bytes(plan, "generate")["engine static pool (weights + KV)"] == pytest.approx(5 * GIB)
    # KV: 2 (K, V) * 2 layers * 1 head per rollout-TP rank * 16 * 2 B = 128 B per token
    assert plan.kv_cache_tokens == (5 * GIB - 87104) // 128
    assert plan.kv_cache_demand_tokens == 2 * 8 * (50 + 100)  # 4 prompts over 2 engines, G = 8
    assert plan.peak_phase == "generate" and plan.peak_gib == pytest.approx(1.0 + 5.0 + 0.5)
    assert plan.fits


def test_full_recompute_and_pipeline_stages():
    config = load_config(None, SMALL_CONFIG + ["parallel.recompute=full"])
    train = _bytes(plan_memory(config, 10, 4, shape=SMALL, prompt_tokens=50), "train")
    # layer inputs (64 / 2 with SP, bf16) for 2 layers + one layer's full set while it is recomputed
    assert train["activations"] == pytest.approx(1000 * 2 * 2 * 32 + 1000 * 704)
    config = load_config(None, SMALL_CONFIG + ["parallel.pipeline_model_parallel_size=2"])
    plan = plan_memory(config, 10, 4, shape=SMALL, prompt_tokens=50)
    train = _bytes(plan, "train")
    assert plan.parallel["dp"] == 1 and train["weights"] == pytest.approx(87104 / 2)
    assert train["activations"] == pytest.approx(2 * 1000 * 1 * 704)  # 1 layer per stage, 2 micro-batches in flight


@pytest.mark.parametrize("name", sorted(KNOWN_SHAPES))
def test_parameter_count_equals_the_transformers_model(name):
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen3VLConfig,
                              Qwen3VLForConditionalGeneration)

    s = KNOWN_SHAPES[name]
    text = dict(hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
                num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, vocab_size=s.vocab,
                tie_word_embeddings=s.tied_embeddings)
    vision = dict(depth=s.vision_layers, hidden_size=s.vision_hidden, intermediate_size=s.vision_intermediate,
                  out_hidden_size=s.hidden)
    if name.startswith("Qwen3"):
        config = Qwen3VLConfig(text_config={**text, "head_dim": s.head_dim},
                               vision_config={**vision, "deepstack_visual_indexes": [8, 16, 24]},
                               tie_word_embeddings=s.tied_embeddings)
        model_cls = Qwen3VLForConditionalGeneration
    else:
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=s.tied_embeddings)
        model_cls = Qwen2_5_VLForConditionalGeneration
    assert ModelShape.from_hf_config(config.to_dict()) == s
    with torch.device("meta"):
        model = model_cls(config)
    assert s.params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.stem)
def test_every_cluster_config_fits_an_80gb_gpu_in_every_phase(path):
    plan = plan_memory(load_config(path), gpu_memory_gib=79.6, gpus=8)
    assert set(plan.phases) == {"generate", "weight_sync", "train"}
    assert plan.fits, plan.report()
    assert all(plan.phase_total(phase) <= 79.6 for phase in plan.phases)


def test_cli_verdict_and_exit_status():
    recipe = str(CONFIGS / "recipes" / "qwen2_5_vl_7b-care.yaml")
    cmd = [sys.executable, str(REPO / "tools" / "estimate_memory.py"), "--config", recipe]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0 and "FITS" in ok.stdout and "8.29B parameters" in ok.stdout
    # the engine's static pool alone would take 95% of the card: the generate phase cannot fit
    bad = subprocess.run(cmd + ["rollout.mem_fraction_static=0.95"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 1 and "DOES NOT FIT" in bad.stdout and "in 'generate'" in bad.stdout
