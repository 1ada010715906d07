#!/usr/bin/env python
"""Benchmark the fused kernels against their naive torch paths.

    python tools/bench_kernels.py            # GPU: T=8192, H=2048, V=151936 bf16; loss at T=65536
    python tools/bench_kernels.py --quick    # smaller GPU sizes (smoke run)

On a GPU each case is timed with ``triton.testing.do_bench`` (median, ms) and its peak extra
memory measured with ``torch.cuda.max_memory_allocated`` above what the inputs already hold. On
CPU it runs a small size with a wall-clock median and says so (no memory column). Cases:

* log-prob forward (no grad): naive (full logits -> fp32 -> log_softmax -> gather) vs fused;
* log-prob forward + entropy (no grad);
* log-prob forward + backward (grads of hidden and weight);
* region loss forward + backward at T=65536: torch reference vs fused Triton vs the fused op
  replayed from a CUDA graph.

Every case runs inside its own try/except (an out-of-memory naive path prints ``failed``), and
the table at the end gives absolute numbers and naive/fused ratios side by side.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from care_megatron.kernels import (  # noqa: E402
    force_kernel_backend,
    linear_logprobs,
    naive_linear_logprobs,
    region_policy_loss,
    region_token_weights,
    sequence_weight_sums,
)
from care_megatron.kernels.graphs import GraphedRegionLoss  # noqa: E402


def _time_ms(fn, on_gpu: bool, grad_to_none=None) -> float:
    if on_gpu:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"))
    samples = []
    for _ in range(5):
        if grad_to_none:
            for tensor in grad_to_none:
                tensor.grad = None
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples[1:])


def _peak_mib(fn, on_gpu: bool) -> float | None:
    if not on_gpu:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _measure(name: str, fn, on_gpu: bool, grad_to_none=None) -> dict:
    try:
        fn()  # compile / warm up outside the memory measurement
        if grad_to_none:
            for tensor in grad_to_none:
                tensor.grad = None
        peak = _peak_mib(fn, on_gpu)
        if grad_to_none:
            for tensor in grad_to_none:
                tensor.grad = None
        ms = _time_ms(fn, on_gpu, grad_to_none)
        if grad_to_none:
            for tensor in grad_to_none:
                tensor.grad = None
        print(f"  {name:<34s} {ms:9.3f} ms   peak {'-' if peak is None else f'{peak:9.1f} MiB'}", flush=True)
        return {"ms": ms, "mib": peak}
    except Exception as error:  # noqa: BLE001 - a benchmark reports and moves on
        print(f"  {name:<34s} failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}", flush=True)
        if on_gpu:
            torch.cuda.empty_cache()
        return {"ms": None, "mib": None, "error": type(error).__name__}


def bench_logprobs(num_tokens, hidden_size, vocab_size, dtype, device, chunk_size, on_gpu):
    generator = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(num_tokens, hidden_size, device=device, dtype=dtype, generator=generator)
    weight = (torch.randn(vocab_size, hidden_size, device=device, generator=generator) * hidden_size**-0.5).to(dtype)
    labels = torch.randint(0, vocab_size, (num_tokens,), device=device, generator=generator)
    rows = []

    def naive_forward(with_entropy=False):
        with torch.no_grad():
            return naive_linear_logprobs(hidden, weight, labels, with_entropy=with_entropy)

    def fused_forward(with_entropy=False):
        with torch.no_grad():
            return linear_logprobs(hidden, weight, labels, chunk_size=chunk_size, with_entropy=with_entropy)

    leaf_hidden = hidden.detach().clone().requires_grad_()
    leaf_weight = weight.detach().clone().requires_grad_()

    def naive_train():
        logprobs, _ = naive_linear_logprobs(leaf_hidden, leaf_weight, labels)
        logprobs.sum().backward()

    def fused_train():
        logprobs, _ = linear_logprobs(leaf_hidden, leaf_weight, labels, chunk_size=chunk_size)
        logprobs.sum().backward()

    # parity on the benchmark inputs themselves, so a fast wrong kernel cannot look good
    with torch.no_grad():
        naive_lp, naive_ent = naive_forward(True)
        fused_lp, fused_ent = fused_forward(True)
    max_diff = max((naive_lp - fused_lp).abs().max().item(), (naive_ent - fused_ent).abs().max().item())
    print(f"  parity: max |naive - fused| over log-probs and entropy = {max_diff:.2e}", flush=True)
    del naive_lp, naive_ent, fused_lp, fused_ent

    for label, naive_fn, fused_fn, grads in (
        ("logprob fwd", naive_forward, fused_forward, None),
        ("logprob fwd + entropy", lambda: naive_forward(True), lambda: fused_forward(True), None),
        ("logprob fwd + bwd", naive_train, fused_train, [leaf_hidden, leaf_weight]),
    ):
        naive = _measure(f"{label} (naive)", naive_fn, on_gpu, grads)
        fused = _measure(f"{label} (fused)", fused_fn, on_gpu, grads)
        rows.append((label, naive, fused))
    return rows, max_diff


def bench_region_loss(num_tokens, device, on_gpu):
    generator = torch.Generator(device="cpu").manual_seed(1)
    lengths = []
    while sum(lengths) < num_tokens:
        lengths.append(int(torch.randint(200, 1200, (1,), generator=generator)))
    lengths[-1] -= sum(lengths) - num_tokens
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0)
    num_sequences = len(lengths)
    sequence_of_token = torch.repeat_interleave(torch.arange(num_sequences), torch.tensor(lengths))
    region_ids = torch.randint(0, 3, (num_tokens,), generator=generator)
    loss_mask = torch.rand(num_tokens, generator=generator) > 0.3
    advantages_per_seq = torch.randn(num_sequences, generator=generator)
    batch = dict(
        region_ids=region_ids,
        loss_mask=loss_mask,
        advantages=advantages_per_seq[sequence_of_token],
        is_positive=(advantages_per_seq > 0)[sequence_of_token],
        has_answer=torch.ones(num_tokens, dtype=torch.bool),
    )
    weights = region_token_weights(region_ids, batch["is_positive"], batch["has_answer"], loss_mask, 0.005)
    batch["weight_sums"] = sequence_weight_sums(weights, cu_seqlens)
    batch = {k: v.to(device) for k, v in batch.items()}
    logprobs = (-torch.rand(num_tokens, generator=generator) * 3).to(device).requires_grad_()
    old = (logprobs.detach() + torch.randn(num_tokens, generator=generator).to(device) * 0.2)
    ref = (logprobs.detach() + torch.randn(num_tokens, generator=generator).to(device) * 0.2)
    normalisers = dict(seq_normaliser=float(num_sequences), token_normaliser=float(loss_mask.sum()))

    def run(backend):
        def step():
            with force_kernel_backend(backend):
                loss, _ = region_policy_loss(logprobs, old, ref_logprobs=ref, **batch, **normalisers)
                loss.backward()
        return step

    graphed = GraphedRegionLoss(bucket_sizes=(num_tokens,))

    def graphed_step():
        loss, _ = graphed(logprobs, old, ref_logprobs=ref, **batch, **normalisers)
        loss.backward()

    reference = _measure("region loss fwd+bwd (torch)", run("reference"), on_gpu, [logprobs])
    fused = _measure("region loss fwd+bwd (fused)", run("triton") if on_gpu else run("reference"), on_gpu, [logprobs])
    rows = [("region loss fwd + bwd", reference, fused)]
    if on_gpu:
        replayed = _measure("region loss fwd+bwd (graph)", graphed_step, on_gpu, [logprobs])
        rows.append(("region loss fwd + bwd, graphed", reference, replayed))
    return rows


def _fmt(value, unit):
    return "failed" if value is None else f"{value:.3f} {unit}" if unit == "ms" else f"{value:.0f} {unit}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller GPU sizes (smoke test)")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        device = torch.device("cuda")
        if args.quick:
            sizes = dict(num_tokens=2048, hidden_size=1024, vocab_size=151936, dtype=torch.bfloat16, chunk_size=1024)
            loss_tokens = 16384
        else:
            sizes = dict(num_tokens=8192, hidden_size=2048, vocab_size=151936, dtype=torch.bfloat16, chunk_size=4096)
            loss_tokens = 65536
        where = f"GPU: {torch.cuda.get_device_name()} (torch {torch.__version__})"
    else:
        device = torch.device("cpu")
        sizes = dict(num_tokens=256, hidden_size=128, vocab_size=8192, dtype=torch.float32, chunk_size=64)
        loss_tokens = 8192
        where = (f"CPU ONLY (no CUDA device): small sizes, torch reference paths, wall-clock medians, no memory "
                 f"numbers; the GPU numbers need a GPU (torch {torch.__version__})")
    print(f"bench_kernels on {where}")
    print(f"log-probs: T={sizes['num_tokens']} H={sizes['hidden_size']} V={sizes['vocab_size']} {sizes['dtype']} "
          f"chunk={sizes['chunk_size']}; region loss: T={loss_tokens}", flush=True)
    started = time.perf_counter()
    logprob_rows, parity = bench_logprobs(device=device, on_gpu=on_gpu, **sizes)
    loss_rows = bench_region_loss(loss_tokens, device, on_gpu)

    print()
    print(f"== results ({where}) ==")
    header = f"{'case':<32s} {'naive':>12s} {'fused':>12s} {'speedup':>8s} {'naive peak':>12s} {'fused peak':>12s} {'mem ratio':>9s}"
    print(header)
    print("-" * len(header))
    for label, naive, fused in logprob_rows + loss_rows:
        speedup = (naive["ms"] / fused["ms"]) if naive["ms"] and fused["ms"] else None
        mem_ratio = (naive["mib"] / fused["mib"]) if naive.get("mib") and fused.get("mib") else None
        print(
            f"{label:<32s} {_fmt(naive['ms'], 'ms'):>12s} {_fmt(fused['ms'], 'ms'):>12s} "
            f"{'-' if speedup is None else f'{speedup:.2f}x':>8s} "
            f"{'-' if naive['mib'] is None else _fmt(naive['mib'], 'MiB'):>12s} "
            f"{'-' if fused['mib'] is None else _fmt(fused['mib'], 'MiB'):>12s} "
            f"{'-' if mem_ratio is None else f'{mem_ratio:.1f}x':>9s}"
        )
    from care_megatron.kernels import logprobs as logprob_module

    print(f"grad_weight accumulation: fp32-output addmm = {logprob_module.FP32_OUTPUT_ADDMM} "
          "(False/None: bf16 product added to an fp32 accumulator)")
    print(f"(naive = full logits -> fp32 -> log_softmax -> gather, or the torch reference loss; speedup = naive / fused;"
          f" peak = max_memory_allocated above the inputs; log-prob parity max abs diff {parity:.2e};"
          f" total {time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
