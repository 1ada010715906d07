"""Training-step throughput: Megatron-Core backend vs transformers + SDPA, same shape, same GPU.

Default shape: the Qwen2.5-VL-3B language model (hidden 2048, 36 layers, 16 heads, 2 KV heads,
FFN 11008, vocab 151936, tied embeddings), one 8192-token packed micro-batch, bf16, forward +
backward of a per-token log-prob objective (no optimizer step), like an RL update.

* megatron: ``QwenVLMegatronModel`` (local spec with the SDPA/varlen core attention unless
  ``--impl transformer_engine``), packed THD forward, fused chunked vocab-parallel log-probs.
* transformers: ``Qwen2ForCausalLM`` with ``attn_implementation="sdpa"``; log-probs from the full
  logits (``log_softmax`` of the fp32 cast, as HF-based RL trainers do).

Reports tokens/s, model TFLOP/s (matmul FLOPs incl. causal attention and the LM head, x3 for
forward + backward), MFU against a bf16 matmul peak measured in the same run, and peak memory.
Quick run: ``--layers 4 --tokens 4096``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--tokens", type=int, default=8192, help="tokens per packed micro-batch")
    p.add_argument("--docs", type=int, default=1, help="documents packed into the micro-batch (equal lengths)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--impl", default="local", choices=["local", "transformer_engine", "auto"])
    p.add_argument("--packed-attention", default=None, choices=[None, "varlen", "flex", "loop"],
                   help="force the local spec's packed attention backend")
    p.add_argument("--chunk", type=int, default=4096, help="log-prob chunk (tokens)")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-megatron", action="store_true")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def model_flops(args) -> float:
    """Matmul FLOPs of one forward+backward (3x forward) over the micro-batch."""
    d = args.hidden // args.heads
    per_layer = args.hidden * (args.heads * d) * 2 + args.hidden * (args.kv_heads * d) * 2 + 3 * args.hidden * args.ffn
    dense = 2 * args.tokens * (args.layers * per_layer + args.hidden * args.vocab)
    doc = args.tokens // args.docs
    attention = args.layers * 2 * 2 * args.docs * (doc * doc / 2) * args.heads * d  # QK^T and PV, causal half
    return 3.0 * (dense + attention)


def measure_matmul_peak(dtype=torch.bfloat16, n=8192, reps=20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def text_config(args):
    from transformers import Qwen2_5_VLConfig

    cfg = Qwen2_5_VLConfig(text_config=dict(
        hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
        max_position_embeddings=max(32768, args.tokens), rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0}))
    return cfg.text_config


def packed_batch(args):
    from care_megatron.data.batch import PackedMicroBatch

    doc = args.tokens // args.docs
    total = doc * args.docs
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (total,), generator=g)
    pos = torch.arange(doc).repeat(args.docs).expand(3, -1).clone()
    cu = torch.arange(0, total + 1, doc, dtype=torch.int32)
    return PackedMicroBatch(input_ids=ids, position_ids=pos, cu_seqlens=cu, loss_mask=torch.ones(total, dtype=torch.bool),
                            region_ids=torch.zeros(total, dtype=torch.long), sequence_indices=torch.arange(args.docs))


def timed(step, args) -> tuple[float, float]:
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / args.iters, torch.cuda.max_memory_allocated() / 2 ** 30


def bench_megatron(args) -> dict:
    import contextlib

    from care_megatron.config.schema import ParallelConfig
    from care_megatron.training.megatron.attention import force_packed_backend
    from care_megatron.training.megatron.model_provider import QwenVLMegatronModel, text_facts_from_hf
    from care_megatron.training.megatron.packed_forward import ForwardOptions, packed_forward
    from care_megatron.training.megatron.parallel_state import initialize_parallel

    parallel = ParallelConfig(backend="megatron", transformer_impl=args.impl)
    initialize_parallel(parallel, seed=0)
    cfg = text_config(args)
    facts = text_facts_from_hf(cfg)
    model = QwenVLMegatronModel(cfg, facts, parallel, torch.bfloat16, use_cpu_initialization=False).cuda()
    batch = packed_batch(args).to("cuda")
    options = ForwardOptions(logprob_chunk_tokens=args.chunk)
    forced = force_packed_backend(args.packed_attention) if args.packed_attention else contextlib.nullcontext()

    def step():
        for p in model.parameters():
            p.grad = None
        with forced:
            out = packed_forward(model, batch, options)
        (-out.logprobs.sum() / batch.num_tokens).backward()

    seconds, mem = timed(step, args)
    model = None  # release the weights before the next contender (step's closure shares this cell)
    gc.collect()
    torch.cuda.empty_cache()
    return {"name": f"megatron-core ({args.impl} spec)", "seconds": seconds, "peak_gib": mem}


def bench_transformers(args) -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                      max_position_embeddings=max(32768, args.tokens), tie_word_embeddings=True, rms_norm_eps=1e-6)
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.train()
    doc = args.tokens // args.docs
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.docs, doc), generator=g).cuda()  # documents as a batch: same attention FLOPs

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        (-logp.sum() / ids.numel()).backward()

    seconds, mem = timed(step, args)
    model = None  # release the weights before the next contender (step's closure shares this cell)
    gc.collect()
    torch.cuda.empty_cache()
    return {"name": "transformers Qwen2 + SDPA", "seconds": seconds, "peak_gib": mem}


def measure_rows(contenders, args, flops: float, peak: float, on_row) -> list[dict]:
    """Run each ``(name, bench)`` contender in turn; each row goes to ``on_row`` as soon as it is
    measured. Out of memory in one contender is that contender's row (the others still run)."""
    rows = []
    for name, bench in contenders:
        try:
            row = bench(args)
        except torch.OutOfMemoryError as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else "out of memory"
            row = {"name": name, "error": f"out of memory: {first_line[:160]}"}
        # the failed contender's frames (and its weights) went with the exception: hand the memory back
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if "seconds" in row:
            row["tokens_per_s"] = args.tokens / row["seconds"]
            row["tflops"] = flops / row["seconds"] / 1e12
            row["mfu"] = flops / row["seconds"] / peak
        rows.append(row)
        on_row(row)
    return rows


def format_row(row: dict) -> str:
    if "error" in row:
        return f"{row['name']:<36}{row['error']}"
    return (f"{row['name']:<36}{row['seconds']:>9.3f}{row['tokens_per_s']:>11.0f}{row['tflops']:>10.1f}"
            f"{row['mfu']:>8.1%}{row['peak_gib']:>10.1f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_train needs a CUDA GPU")
        return 1
    peak = measure_matmul_peak()
    flops = model_flops(args)
    print(f"GPU: {torch.cuda.get_device_name()}  measured bf16 matmul peak: {peak / 1e12:.1f} TFLOP/s")
    print(f"shape: layers={args.layers} hidden={args.hidden} heads={args.heads}/{args.kv_heads} ffn={args.ffn} "
          f"vocab={args.vocab} tokens={args.tokens} docs={args.docs}  (fwd+bwd, bf16, no optimizer)")
    print(f"{'implementation':<36}{'s/step':>9}{'tok/s':>11}{'TFLOP/s':>10}{'MFU':>8}{'peak GiB':>10}", flush=True)
    contenders = []
    if not args.skip_megatron:
        contenders.append((f"megatron-core ({args.impl} spec)", bench_megatron))
    if not args.skip_hf:
        contenders.append(("transformers Qwen2 + SDPA", bench_transformers))

    def on_row(row):
        print(format_row(row), flush=True)
        if args.json:  # rewritten after every row, so a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"peak_tflops": peak / 1e12, "args": vars(args), "rows": rows_so_far + [row]}, f, indent=2)
        rows_so_far.append(row)

    rows_so_far: list[dict] = []
    rows = measure_rows(contenders, args, flops, peak, on_row)
    measured = [r for r in rows if "seconds" in r]
    if len(measured) == 2:
        print(f"speed-up {measured[0]['name']} over {measured[1]['name']}: "
              f"{measured[1]['seconds'] / measured[0]['seconds']:.3f}x")
    return 0 if measured else 1


if __name__ == "__main__":
    raise SystemExit(main())
