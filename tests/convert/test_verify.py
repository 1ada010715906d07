"""verify.py: identical models pass with zero difference, a perturbed model fails, statistics are exact."""
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from checkpoints_convert.hf_to_megatron import convert_hf_to_megatron
from checkpoints_convert.verify import compare_logits, main as verify_main, verify


def test_compare_logits_closed_form():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    report = compare_logits(a, b, atol=0.5, min_top1=0.5)
    assert report.max_abs_logit_diff == 1.0 and report.min_cosine_similarity == 0.0
    assert report.top1_agreement == 0.5 and report.num_positions == 2 and not report.passed


def test_megatron_checkpoint_verifies_exactly(saved_model_dirs, tmp_path):
    source = saved_model_dirs("qwen2_5_vl", False)
    convert_hf_to_megatron(source, str(tmp_path / "mg"), tp=2, pp=2, fmt="legacy", show_progress=False)
    report = verify(source, str(tmp_path / "mg"), atol=0.0)
    assert report.passed and report.max_abs_logit_diff == 0.0 and report.top1_agreement == 1.0
    assert report.num_positions == 18 and abs(report.min_cosine_similarity - 1.0) < 1e-12


def test_perturbed_model_fails(saved_model_dirs, tmp_path):
    source = saved_model_dirs("qwen3_vl", False)
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.language_model.layers.1.mlp.down_proj.weight"] *= 3.0
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    assert verify_main(["--hf-dir", source, "--other", str(broken), "--atol", "1e-5"]) == 1
    assert verify_main(["--hf-dir", source, "--other", source, "--atol", "0"]) == 0


def test_verify_with_tokenizer_and_image_processor(tmp_path):
    """The project's tiny Qwen2.5-VL with its real tokenizer and image processor: the processor batch
    path (chat prompt + image through Qwen2VLImageProcessorPil) and a TP=2 / PP=2 checkpoint."""
    from care_megatron.config.schema import ModelConfig
    from care_megatron.models.registry import build_model_and_processor
    from checkpoints_convert.verify import build_batch

    model, tokenizer, image_processor = build_model_and_processor(ModelConfig())
    source = str(tmp_path / "tiny")
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    image_processor.save_pretrained(source)
    batch = build_batch(model.eval(), source)
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == int(batch["image_grid_thw"].prod()) // 4
    convert_hf_to_megatron(source, str(tmp_path / "mg"), tp=2, pp=2, fmt="legacy", show_progress=False)
    report = verify(source, str(tmp_path / "mg"), atol=0.0)
    assert report.passed and report.max_abs_logit_diff == 0.0
