"""Worker of test_vocab_parallel_tp2.py (spawned, gloo, CPU; TRITON_INTERPRET=1 comes from the parent)."""
import os

import torch

TOKENS, HIDDEN, VOCAB, PADDED_VOCAB = 29, 16, 50, 64  # TP=2: shard 32 rows; rank 1 holds 18 real + 14 padding
TEMPERATURE = 0.7


def problem():
    """Same tensors in every process; the padding rows get large logits, so a leak into the softmax shows."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(TOKENS, HIDDEN, generator=g)
    weight = torch.randn(PADDED_VOCAB, HIDDEN, generator=g) * 0.5
    weight[VOCAB:] = 3.0
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    return hidden, weight, targets, torch.randn(TOKENS, generator=g), torch.randn(TOKENS, generator=g)


def worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    from care_megatron.kernels import force_kernel_backend, interpreter_active
    from care_megatron.training.megatron.logprobs import vocab_parallel_logprobs

    hidden, weight, targets, grad_logprobs, grad_entropy = problem()
    shard = PADDED_VOCAB // world
    results = {"interpreter": interpreter_active()}
    for sequence_parallel, implementation in [(sp, impl) for sp in (False, True) for impl in ("torch", "fused")]:
        h = hidden.clone().requires_grad_(True)
        w = weight[rank * shard:(rank + 1) * shard].clone().requires_grad_(True)
        with force_kernel_backend("triton" if implementation == "fused" else "reference"):
            logprobs, entropy = vocab_parallel_logprobs(
                h, w, targets, vocab_start=rank * shard, vocab_size=VOCAB, group=dist.group.WORLD, chunk_size=8,
                with_entropy=True, reduce_grad_input=not sequence_parallel, temperature=TEMPERATURE,
                implementation=implementation)
            (logprobs * grad_logprobs + entropy * grad_entropy).sum().backward()
        results[sequence_parallel, implementation] = {"logprobs": logprobs.detach(), "entropy": entropy.detach(),
                                   "grad_hidden": h.grad.clone(), "grad_weight": w.grad.clone()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
