"""Every example config loads and validates; the cluster recipes carry the paper's settings; the
loader's ``base:`` composition merges in order, resolves relative paths and rejects cycles."""
from __future__ import annotations

from pathlib import Path

import pytest

import care_megatron
from care_megatron.config import load_config
from care_megatron.config.loader import read_config_file

CONFIGS = Path(care_megatron.__file__).resolve().parent.parent / "examples" / "configs"
ALL = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "methods")
RECIPES = sorted((CONFIGS / "recipes").glob("*.yaml"))
MODELS = ("qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen3_vl_8b")
CHECKPOINTS = {"qwen2_5_vl_3b": "Qwen2.5-VL-3B-Instruct", "qwen2_5_vl_7b": "Qwen2.5-VL-7B-Instruct",
               "qwen3_vl_8b": "Qwen3-VL-8B-Instruct"}
METHODS = ("care", "care_no_rgr", "grpo", "dapo", "gspo")
# spec section 7: (clip_low, clip_high, kl_coef) per method
PAPER = {"care": (0.2, 0.28, 0.02), "care_no_rgr": (0.2, 0.28, 0.02), "grpo": (0.2, 0.2, 0.02),
         "dapo": (0.2, 0.28, 0.0), "gspo": (3e-4, 4e-4, 0.0)}


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_example_config_loads_and_validates(path):
    config = load_config(path)
    assert config.train.steps >= 1


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_qwen3_vl_8b_configs_use_reasoning_tags(path):
    """The CARE paper's appendix 8.2: ``<reasoning>`` for Qwen3-VL-8B, ``<think>`` for the others."""
    config = load_config(path)
    assert config.data.think_tag == ("reasoning" if "Qwen3-VL-8B" in config.model.name else "think")


def test_reasoning_tags_reach_both_qwen3_vl_8b_configs_and_their_recipes():
    reasoning = {str(p.relative_to(CONFIGS)) for p in ALL if load_config(p).data.think_tag == "reasoning"}
    assert reasoning == {"qwen3_vl_8b.yaml", "qwen3_vl_8b_long_cp.yaml"} | \
        {f"recipes/qwen3_vl_8b-{method}.yaml" for method in METHODS}


def test_one_recipe_per_model_and_method():
    assert {p.stem for p in RECIPES} == {f"{m}-{meth}" for m in MODELS for meth in METHODS}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_has_the_paper_settings_and_an_8_gpu_layout(path):
    model, method = path.stem.split("-")
    config = load_config(path)
    assert Path(config.model.name).name == CHECKPOINTS[model]
    assert config.algorithm.name == ("care" if method.startswith("care") else method)
    defaults = config.algorithm.defaults()
    assert (defaults["clip_low"], defaults["clip_high"], defaults["kl_coef"]) == pytest.approx(PAPER[method])
    assert config.rollout.group_size == 8
    if method.startswith("care"):
        assert config.algorithm.rgr is (method == "care")
        assert config.algorithm.care["k"] == 4 and config.algorithm.care["think_weight_pos"] == 0.005
    # what tools/prepare_data.py --out /data/care_mixture writes
    assert config.data.tasks == ["jsonl:/data/care_mixture/train.jsonl"]
    assert config.train.output_dir == f"runs/{model}-{method}"
    p = config.parallel
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    assert p.backend == "megatron" and 8 % model_parallel == 0 and 8 % config.rollout.tensor_parallel_size == 0


def test_base_composition_order_relative_paths_and_overrides(tmp_path):
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "a.yaml").write_text("train: {steps: 7, lr: 0.5}\nalgorithm: {name: grpo}\n")
    (tmp_path / "parts" / "b.yaml").write_text("base: a.yaml\ntrain: {lr: 0.25}\nalgorithm: {care: {k: 3}}\n")
    (tmp_path / "c.yaml").write_text("base: [parts/b.yaml]\nalgorithm: {name: gspo, care: {neg_scale: 0.4}}\n")
    assert read_config_file(tmp_path / "c.yaml") == {
        "train": {"steps": 7, "lr": 0.25}, "algorithm": {"name": "gspo", "care": {"k": 3, "neg_scale": 0.4}}}
    config = load_config(tmp_path / "c.yaml", ["train.steps=9"])
    assert (config.train.steps, config.train.lr, config.algorithm.name) == (9, 0.25, "gspo")


def test_base_errors_name_the_file(tmp_path):
    (tmp_path / "x.yaml").write_text("base: y.yaml\n")
    (tmp_path / "y.yaml").write_text("base: x.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        load_config(tmp_path / "x.yaml")
    (tmp_path / "z.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ValueError, match="missing.yaml"):
        load_config(tmp_path / "z.yaml")
    (tmp_path / "w.yaml").write_text("base: {a: 1}\n")
    with pytest.raises(ValueError, match="'base' must be"):
        load_config(tmp_path / "w.yaml")
