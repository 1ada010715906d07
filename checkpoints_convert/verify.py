"""Check that a converted model computes what the original computes.

    python checkpoints_convert/verify.py --hf-dir D --other O [--atol 1e-4] [--min-top1 1.0] [--dtype float32]

``O`` is a Megatron checkpoint written by ``hf_to_megatron.py`` (it is converted back to a temporary
HF directory through ``megatron_to_hf.py``, i.e. through the same mapping the training backend and
the weight export use) or another HF directory (e.g. the output of ``megatron_to_hf.py``). Both
models run the same image + text batch; reported: max |logit difference|, cosine similarity of the
logit vectors (minimum over positions), top-1 agreement. Exit status 1 beyond tolerance.

The batch: with a tokenizer and ``preprocessor_config.json`` in ``D``, a chat prompt with one
synthetic image through ``Qwen2VLImageProcessorPil`` (no torchvision needed); otherwise (tiny test
models) random pixel patches and token ids shaped from the config. Text-only models get text only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch


@dataclass
class VerifyReport:
    """Agreement between two models' logits on one batch."""

    max_abs_logit_diff: float
    """max |logits_a - logits_b| over every position and vocabulary entry."""
    min_cosine_similarity: float
    """Minimum over positions of the cosine similarity between the two logit vectors."""
    top1_agreement: float
    """Fraction of positions whose argmax token agrees."""
    num_positions: int
    """Positions compared."""
    passed: bool
    """Whether the thresholds were met."""


def _load_model(directory: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(directory)
    cls = AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM
    return cls.from_pretrained(directory, dtype=dtype).eval()


def build_batch(model, hf_dir: str, seed: int = 0) -> dict:
    """One image + text prompt for ``model`` (see the module docstring for the two variants)."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    vision = getattr(config, "vision_config", None)
    text_vocab = getattr(getattr(config, "text_config", config), "vocab_size")
    if vision is None:
        input_ids = torch.randint(0, text_vocab, (1, 32), generator=generator)
        return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    image_token = config.image_token_id
    merge = vision.spatial_merge_size
    if os.path.exists(os.path.join(hf_dir, "preprocessor_config.json")) and _has_tokenizer(hf_dir):
        import numpy as np
        from PIL import Image
        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

        processor = Qwen2VLImageProcessorPil.from_pretrained(hf_dir)
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        pixels = (torch.rand(112, 140, 3, generator=generator) * 255).to(torch.uint8).numpy().astype(np.uint8)
        image_inputs = processor(images=[Image.fromarray(pixels)], return_tensors="pt")
        n_tokens = int(image_inputs["image_grid_thw"].prod()) // merge ** 2
        prompt = ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * n_tokens +
                  "<|vision_end|>What shape is in the picture?<|im_end|>\n<|im_start|>assistant\n")
        input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        pixel_values, grid = image_inputs["pixel_values"], image_inputs["image_grid_thw"]
    else:
        grid = torch.tensor([[1, 2 * merge, 2 * merge]])
        patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        pixel_values = torch.randn(int(grid.prod()), patch_dim, generator=generator)
        n_tokens = int(grid.prod()) // merge ** 2
        low = min(image_token, config.vision_start_token_id, config.vision_end_token_id, text_vocab)
        text = torch.randint(0, low, (12,), generator=generator)
        input_ids = torch.cat([text[:4], torch.tensor([config.vision_start_token_id]),
                               torch.full((n_tokens,), image_token), torch.tensor([config.vision_end_token_id]),
                               text[4:]])[None]
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                pixel_values=pixel_values.to(model.dtype), image_grid_thw=grid,
                mm_token_type_ids=(input_ids == image_token).int())


def _has_tokenizer(directory: str) -> bool:
    return any(os.path.exists(os.path.join(directory, f)) for f in ("tokenizer.json", "vocab.json"))


def compare_logits(a: torch.Tensor, b: torch.Tensor, atol: float, min_top1: float) -> VerifyReport:
    """Compare logits [..., V] of two models (computed in float64 for the statistics)."""
    a, b = a.double().reshape(-1, a.shape[-1]), b.double().reshape(-1, b.shape[-1])
    max_diff = (a - b).abs().max().item()
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()
    top1 = (a.argmax(-1) == b.argmax(-1)).double().mean().item()
    return VerifyReport(max_diff, cosine, top1, a.shape[0], passed=max_diff <= atol and top1 >= min_top1)


def verify(hf_dir: str, other: str, atol: float = 1e-4, min_top1: float = 1.0, dtype: torch.dtype = torch.float32,
           seed: int = 0) -> VerifyReport:
    """Run both models on the same batch and compare their logits."""
    with tempfile.TemporaryDirectory() as scratch:
        if os.path.exists(os.path.join(other, "conversion.json")):
            from checkpoints_convert.megatron_to_hf import convert_megatron_to_hf

            convert_megatron_to_hf(other, scratch, show_progress=False)
            other = scratch
        reference, candidate = _load_model(hf_dir, dtype), _load_model(other, dtype)
        batch = build_batch(reference, hf_dir, seed)
        with torch.no_grad():
            logits_a = reference(**batch).logits
            logits_b = candidate(**batch).logits
    return compare_logits(logits_a, logits_b, atol, min_top1)


def main(argv=None) -> int:
    from checkpoints_convert.hf_io import torch_dtype_of

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="the original Hugging Face model directory")
    parser.add_argument("--other", required=True, help="a Megatron checkpoint (hf_to_megatron.py) or an HF directory")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest allowed |logit difference|")
    parser.add_argument("--min-top1", type=float, default=1.0, help="smallest allowed top-1 agreement")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    report = verify(args.hf_dir, args.other, args.atol, args.min_top1, torch_dtype_of(args.dtype), args.seed)
    print(json.dumps(asdict(report), indent=2))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
