"""One full RL step at the Qwen2.5-VL-3B shape with random weights, with per-phase times.

The embedded default's loop (``RLTrainer.step``: HF-engine rollouts on the synthetic visual tasks,
verifier rewards, CARE advantages with reflection-guided resampling, policy and reference
log-probs, one CARE update on the plain-PyTorch backend) on a model with the released 3B model's
text and vision dimensions (36 x 2048 decoder, GQA 16 / 2, FFN 11008, vocabulary 151936; 32-block
vision tower of width 1280) and random weights, so it needs no checkpoint download. The tokenizer
is the embedded tiny one (its ids fit inside the 151936-row embedding), so the answers are noise:
this measures time and memory per phase, and that a whole step runs at this size.

``--shape tiny`` runs the same step on the tiny model (the CPU test of this tool).
Prints one JSON object: the phase timings (``timing/<phase>`` seconds), the peak GPU memory and a
few step metrics; ``--json`` also writes it to a file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

MODEL_NAME = "random_qwen2_5_vl_3b"
TEXT_3B = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768)
MROPE_3B = [16, 24, 24]
VISION_3B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                 fullatt_block_indexes=[7, 15, 23, 31])


def register_3b_model() -> None:
    """Add ``random_qwen2_5_vl_3b`` to the model registry: the tiny model's config (token ids, rope
    type, vision patching) with the 3B model's dimensions."""
    from transformers import Qwen2_5_VLConfig

    from care_megatron.models import registry

    tiny_factory = registry.MODEL_REGISTRY["tiny_qwen2_5_vl"]["config"]

    def factory(vocab_size: int, token_ids: dict):
        tiny = tiny_factory(vocab_size, token_ids)
        text = {k: v for k, v in tiny.text_config.to_dict().items() if k not in ("layer_types", "model_type")}
        text.update(TEXT_3B)
        text["rope_parameters"] = dict(text["rope_parameters"], mrope_section=list(MROPE_3B))
        vision = {k: v for k, v in tiny.vision_config.to_dict().items() if k != "model_type"}
        vision.update(VISION_3B)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=tiny.image_token_id,
                                video_token_id=tiny.video_token_id, vision_start_token_id=tiny.vision_start_token_id,
                                vision_end_token_id=tiny.vision_end_token_id, tie_word_embeddings=False)

    registry.MODEL_REGISTRY[MODEL_NAME] = {"arch": "qwen2_5_vl", "config": factory}


def run_config(shape: str, output_dir: str, group_size: int, prompts: int, max_new_tokens: int):
    from care_megatron.config.loader import load_config

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    overrides = [
        f"model.name={MODEL_NAME if shape == '3b' else 'tiny_qwen2_5_vl'}",
        f"model.dtype={'bfloat16' if shape == '3b' else 'float32'}",
        "train.init_from=null", "train.steps=1", f"train.output_dir={output_dir}",
        f"data.train_size={4 * prompts}", "data.eval_size=0", f"data.prompts_per_step={prompts}",
        "data.tasks=[count_shapes,tallest_bar,triangle_angle,compare_lengths]",  # easy-VQA is not on the GPU image
        f"rollout.group_size={group_size}", f"rollout.max_new_tokens={max_new_tokens}",
    ]
    return load_config(os.path.join(repo, "examples", "configs", "tiny_cpu.yaml"), overrides)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["3b", "tiny"], default="3b")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from care_megatron.trainer import RLTrainer

    if args.shape == "3b":
        register_3b_model()
    on_gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as output_dir:
        config = run_config(args.shape, output_dir, args.group_size, args.prompts, args.max_new_tokens)
        started = time.perf_counter()
        trainer = RLTrainer(config, progress=False)
        build_seconds = time.perf_counter() - started
        parameters = sum(p.numel() for p in trainer.model.parameters())
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        metrics = trainer.step(0)
    report = {
        "shape": args.shape, "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "parameters": parameters, "build_seconds": round(build_seconds, 2),
        "rollouts": args.prompts * args.group_size, "max_new_tokens": args.max_new_tokens,
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if on_gpu else None,
        "timings": {k: round(v, 3) for k, v in sorted(metrics.items()) if k.startswith("timing/")},
        "skipped": bool(metrics.get("skipped", False)),
        "loss": metrics.get("train/loss", metrics.get("loss")),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
