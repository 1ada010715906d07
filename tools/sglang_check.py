#!/usr/bin/env python
"""Real-SGLang check of the rollout adapter (run by tools/gpu_check.sh wherever ``sglang`` imports).

Starts ``SGLangRolloutEngine`` on a tiny Qwen2.5-VL saved as an HF directory, then, side by side with
the HF engine on the same GPU and weights:
  1. greedy completions of image prompts: token agreement and behaviour log-prob gap;
  2. weights perturbed in the trainer, pushed through ``update_weights`` (flattened-bucket CUDA IPC)
     under the checkpoint names SGLang's loader maps (``model.layers.*``, ``visual.*``: the names of
     the saved directory, not transformers-5 module names such as ``model.language_model.*``): the
     engine follows (agreement with the HF engine on the new weights) and differs from before;
  3. the colocated cycle: sleep (weights and KV cache released; SGLang keeps no copy of the
     weights) -> wake the weights -> re-send them -> wake the KV cache -> same greedy completions
     again; generating before the re-send must be refused.
Prints a table; exits non-zero when a check fails. Not a timed assertion.
"""
import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch


def checkpoint_names(model, hf_dir: Path) -> dict[str, str]:
    """Module name of each of ``model``'s tensors -> the name it has in the saved ``hf_dir``, which
    is the name SGLang's loader mapped when it started from that directory (transformers 5 saves
    Qwen2.5-VL as ``model.layers.*`` / ``visual.*`` while its modules are ``model.language_model.*`` /
    ``model.visual.*``; SGLang 0.5.x's Qwen2.5-VL ``load_weights`` raises KeyError on the latter)."""
    from safetensors import safe_open

    from care_megatron.rollout.hf_engine import checkpoint_name_to_module_name

    saved = set()
    for shard in Path(hf_dir).glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            saved.update(f.keys())
    module_names = set(model.state_dict())
    to_checkpoint = {checkpoint_name_to_module_name(name, module_names): name for name in saved}
    missing = sorted(module_names - set(to_checkpoint))
    if missing:
        raise ValueError(f"no saved checkpoint name for {missing[:3]} in {hf_dir}")
    return to_checkpoint


def sleep_wake_resend(engine, weights, request, sampling) -> bool:
    """The colocated cycle: release everything, wake the weights, re-send them (SGLang kept no
    copy), wake the KV cache. Returns whether generating before the re-send was refused."""
    engine.sleep()
    engine.wake(("weights",))
    try:
        engine.generate(request, sampling)
        refused = False
    except RuntimeError:
        refused = True
    engine.update_weights(weights())
    engine.wake(("kv_cache",))
    return refused


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--min-agreement", type=float, default=0.9, help="share of identical greedy tokens")
    args = parser.parse_args()

    from care_megatron.config.schema import ModelConfig
    from care_megatron.data.prompting import build_prompt
    from care_megatron.data.synthetic import generate
    from care_megatron.experience import prompt_request
    from care_megatron.models import build_model_and_processor
    from care_megatron.rollout.base import SamplingParams
    from care_megatron.rollout.hf_engine import HFRolloutEngine
    from care_megatron.rollout.sglang_engine import SGLangEngineConfig, SGLangRolloutEngine, pick_nccl_port
    from care_megatron.sft import save_policy

    # bfloat16 on both sides: SGLang 0.5.23's default attention on Hopper (FlashAttention-3) has no float32 path
    model, tok, ip = build_model_and_processor(ModelConfig(dtype="bfloat16"), device="cuda", min_pixels=56 * 56,
                                               max_pixels=56 * 56)
    model = model.eval()
    hf_dir = Path(tempfile.mkdtemp()) / "tiny"
    save_policy(model, tok, hf_dir)
    ip.save_pretrained(hf_dir)  # SGLang loads the processor (its pixel bounds) from the model directory
    to_checkpoint = checkpoint_names(model, hf_dir)

    def policy_weights():
        return ((to_checkpoint[name], t.detach()) for name, t in model.state_dict().items())

    records = generate("count_shapes", args.prompts, seed=1)
    requests = [prompt_request(build_prompt(r.question, r.images, tok, ip), f"p{i}") for i, r in enumerate(records)]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens)

    vision = model.config.vision_config
    sgl = SGLangRolloutEngine(SGLangEngineConfig(model_path=str(hf_dir), mem_fraction_static=0.3, dtype="bfloat16",
                                                 nccl_port=pick_nccl_port(0), image_patch_size=vision.patch_size,
                                                 image_merge_size=vision.spatial_merge_size,
                                                 image_min_pixels=56 * 56, image_max_pixels=56 * 56),
                              tokenizer=tok)
    hf = HFRolloutEngine(model, tok, device="cuda")
    rows, ok = [], True

    def compare(label):
        nonlocal ok
        a, b = sgl.generate(requests, greedy), hf.generate(requests, greedy)
        same = total = 0
        gaps = []
        for ca, cb in zip(a, b):
            n = min(len(ca.token_ids), len(cb.token_ids))
            prefix = next((i for i in range(n) if ca.token_ids[i] != cb.token_ids[i]), n)
            same += prefix
            total += max(len(ca.token_ids), len(cb.token_ids))
            gaps += [abs(x - y) for x, y in zip(ca.logprobs[:prefix], cb.logprobs[:prefix])]
        agreement = same / max(total, 1)
        gap = sum(gaps) / max(len(gaps), 1)
        good = agreement >= args.min_agreement
        ok &= good
        rows.append((label, agreement, gap, "ok" if good else "FAIL"))
        return a

    before = compare("start (same weights)")
    with torch.no_grad():  # a "training step": perturb every weight, then sync
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    sgl.update_weights(policy_weights())
    after = compare("after update_weights")
    changed = sum(x.token_ids != y.token_ids for x, y in zip(before, after))
    rows.append(("completions changed by update", changed / len(before), 0.0, "ok" if changed else "FAIL"))
    ok &= changed > 0
    refused = sleep_wake_resend(sgl, policy_weights, requests[:1], greedy)
    rows.append(("generate before re-send refused", float(refused), 0.0, "ok" if refused else "FAIL"))
    ok &= refused
    compare("after sleep / wake / re-send")
    sgl.shutdown()
    print(f"\n{'check':<32} {'agreement':>10} {'|dlogp|':>10} result   ({torch.cuda.get_device_name()})")
    for label, agreement, gap, verdict in rows:
        print(f"{label:<32} {agreement:>10.3f} {gap:>10.2e} {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
