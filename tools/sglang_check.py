#!/usr/bin/env python
"""Real-SGLang check of the rollout adapter (run by tools/gpu_check.sh wherever ``sglang`` imports).

Starts ``SGLangRolloutEngine`` on a tiny Qwen2.5-VL saved as an HF directory, then, side by side with
the HF engine on the same GPU and weights:
  1. greedy completions of image prompts: token agreement and behaviour log-prob gap;
  2. weights perturbed in the trainer, pushed through ``update_weights`` (flattened-bucket CUDA IPC):
     the engine follows (agreement with the HF engine on the new weights) and differs from before;
  3. sleep (release_memory_occupation) -> wake -> same greedy completions again.
Prints a table; exits non-zero when a check fails. Not a timed assertion.
"""
import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch


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
    from care_megatron.rollout.sglang_engine import SGLangEngineConfig, SGLangRolloutEngine
    from care_megatron.sft import save_policy

    model, tok, ip = build_model_and_processor(ModelConfig(), device="cuda", min_pixels=56 * 56, max_pixels=56 * 56)
    model = model.eval()
    hf_dir = Path(tempfile.mkdtemp()) / "tiny"
    save_policy(model, tok, hf_dir)
    records = generate("count_shapes", args.prompts, seed=1)
    requests = [prompt_request(build_prompt(r.question, r.images, tok, ip), f"p{i}") for i, r in enumerate(records)]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens)

    sgl = SGLangRolloutEngine(SGLangEngineConfig(model_path=str(hf_dir), mem_fraction_static=0.3, dtype="float32"),
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
    sgl.update_weights((n, t.detach()) for n, t in model.state_dict().items())
    after = compare("after update_weights")
    changed = sum(x.token_ids != y.token_ids for x, y in zip(before, after))
    rows.append(("completions changed by update", changed / len(before), 0.0, "ok" if changed else "FAIL"))
    ok &= changed > 0
    sgl.sleep()
    sgl.wake()
    compare("after sleep / wake")
    sgl.shutdown()
    print(f"\n{'check':<32} {'agreement':>10} {'|dlogp|':>10} result   ({torch.cuda.get_device_name()})")
    for label, agreement, gap, verdict in rows:
        print(f"{label:<32} {agreement:>10.3f} {gap:>10.2e} {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
