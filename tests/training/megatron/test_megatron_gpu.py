"""GPU checks of the Megatron backend (run by tools/gpu_check.sh on an H100; skipped on CPU).

* packed-attention kernels (flash varlen, compiled flex_attention) equal the per-document SDPA loop
  in bf16 on THD batches, and so does the context-parallel attention's compiled flex path;
* MegatronBackend on the GPU path (Megatron DDP + Megatron optimizer, bf16) matches transformers:
  its log-prob error against the fp32 reference is no worse than transformers' own bf16 error, and
  train_step runs (finite norms, loss equal to the fp32 objective within bf16 tolerance, loss falls
  for a fixed batch).
"""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("megatron.core")

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["varlen", "flex"])
def test_packed_attention_kernels_match_loop_bf16(backend):
    from care_megatron.training.megatron import attention

    if backend == "varlen" and not attention._varlen_available():
        pytest.skip("torch.nn.attention.varlen not in this torch")
    torch.manual_seed(0)
    cu = torch.tensor([0, 700, 701, 2048, 4096], dtype=torch.int32, device="cuda")
    q = torch.randn(4096, 16, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(4096, 2, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(4096, 2, 128, device="cuda", dtype=torch.bfloat16)
    ref = attention.packed_causal_attention_loop(q, k, v, cu, 128 ** -0.5)
    out = attention.packed_causal_attention(q, k, v, cu, 128 ** -0.5, backend=backend)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_compiled_flex_compiles_a_bounded_number_of_times_forward_and_backward():
    """Three packed lengths, each forward + backward and a no-grad forward: two compilations per kind
    (static, then dynamic), whatever the lengths; never the eager fallback (its [T, T] scores)."""
    from care_megatron.training.megatron import attention, compiled_flex

    flex = compiled_flex.CompiledFlexAttention()
    for total in (1024, 1536, 2304):
        cu = torch.tensor([0, total // 3, total - 5, total], dtype=torch.int32, device="cuda")
        q, k, v = (torch.randn(1, heads, total, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for heads in (16, 2, 2))
        mask = attention.document_block_mask(cu, total, q.device)
        out = flex(q, k, v, block_mask=mask, scale=128 ** -0.5, enable_gqa=True)
        out.float().square().sum().backward()
        assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all() and k.grad.shape == k.shape
        with torch.no_grad():
            again = flex(q, k, v, block_mask=mask, scale=128 ** -0.5, enable_gqa=True)
        torch.testing.assert_close(again.float(), out.detach().float(), atol=1e-2, rtol=1e-2)
        ref = attention.packed_causal_attention_loop(*(x.detach()[0].transpose(0, 1) for x in (q, k, v)), cu, 128 ** -0.5)
        torch.testing.assert_close(out.detach()[0].transpose(0, 1).float(), ref.float(), atol=2e-2, rtol=2e-2)
    assert flex.compilations("train_square") <= 2, flex.compilations("train_square")
    assert flex.compilations("no_grad_square") <= 2, flex.compilations("no_grad_square")


def test_context_parallel_flex_compiled_matches_full_attention_bf16():
    """The CP attention's compute half on CUDA (compiled flex_attention, query rows of one CP rank
    against every key) equals those rows of full per-document attention."""
    from care_megatron.training.megatron import attention
    from care_megatron.training.megatron.context_parallel import build_layout, local_queries_attention

    torch.manual_seed(0)
    cp = 2
    cu = torch.tensor([0, 1500, 1501, 4000], dtype=torch.int32)
    lay = build_layout(cu, torch.zeros(4000, dtype=torch.long), torch.zeros(3, 4000, dtype=torch.long), cp_size=cp,
                       cp_rank=1, total_multiple=2 * cp)
    total = lay.num_padded_tokens
    q = torch.randn(total, 16, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(total, 2, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(total, 2, 128, device="cuda", dtype=torch.bfloat16)
    full = attention.packed_causal_attention_loop(q, k, v, lay.padded_cu_seqlens.cuda(), 128 ** -0.5)
    rows = lay.local_index.cuda()
    out = local_queries_attention(q[rows], k, v, tuple(lay.padded_cu_seqlens.tolist()), cp, 1, 128 ** -0.5,
                                  backend="flex")
    torch.testing.assert_close(out.float(), full[rows].float(), atol=2e-2, rtol=2e-2)


def test_megatron_backend_bf16_parity_and_train_step(tmp_path):
    import _megatron_workers as workers

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(workers.gpu_bf16_worker, args=(1, port, str(tmp_path)), nprocs=1, join=True, start_method="spawn")
    r = torch.load(os.path.join(tmp_path, "gpu_result.pt"))
    print(r)
    assert not r["cpu_path"]
    assert r["megatron_mean_err"] <= 1.5 * r["hf_bf16_mean_err"] + 1e-3, r
    assert r["megatron_err"] <= 2.0 * r["hf_bf16_err"] + 1e-2, r
    assert r["first_loss_err"] < 5e-2, r  # bf16 model vs fp32 transformers objective
    assert not any(r["skipped"]) and all(n == n and n < 1e4 for n in r["grad_norms"]), r
    assert r["losses"][-1] < r["losses"][0], r
    # every parameter counted once: the norm of the change equals that of the HF-layout weights' change
    assert r["update_norm"] > 0 and abs(r["update_norm"] - r["exported_update_norm"]) <= 1e-6 * r["exported_update_norm"], r


def fp16_worker(rank, world, port, out_dir):
    """GPU: MegatronBackend in fp16 (Megatron's dynamic loss scaler, initial scale 2**32): the steps
    overflow and are skipped until the scale has backed off, and the first applied step's gradient
    norm is the true one (the optimizer unscales what the schedule scaled)."""
    import _megatron_workers as workers
    from _megatron_fixtures import standard_batches, tiny_hf_model

    from care_megatron.config.schema import ParallelConfig, TrainConfig
    from care_megatron.training.megatron.backend import MegatronBackend, MegatronBackendOptions
    from care_megatron.training.megatron.parallel_state import destroy_parallel

    workers._setup(rank, world, port)
    hf32 = tiny_hf_model(tie=False)
    batches = standard_batches(hf32)
    normalisers = {"tokens": float(sum(int(mb.loss_mask.sum()) for mb in batches))}
    _, hf_grads = workers.hf_loss_and_grads(hf32, batches, normalisers)
    reference_norm = float(sum(float(g.double().square().sum()) for g in hf_grads.values()) ** 0.5)
    backend = MegatronBackend(hf32.config, hf32.state_dict(), parallel=ParallelConfig(backend="megatron", transformer_impl="local"),
                              train=TrainConfig(lr=1e-3), dtype=torch.float16,
                              options=MegatronBackendOptions(logprob_chunk_tokens=32))
    steps = []
    for _ in range(80):
        result = backend.train_step(batches, workers.loss_fn, normalisers)
        steps.append((result.skipped, result.grad_norm))
        if not result.skipped:
            break
    torch.save({"steps": steps, "reference_norm": reference_norm, "cpu_path": backend.cpu_path},
               os.path.join(out_dir, "fp16_result.pt"))
    destroy_parallel()


def test_megatron_backend_fp16_loss_scaling(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(fp16_worker, args=(1, port, str(tmp_path)), nprocs=1, join=True, start_method="spawn")
    r = torch.load(os.path.join(tmp_path, "fp16_result.pt"))
    print(r)
    assert not r["cpu_path"]
    assert r["steps"][0][0], "at a loss scale of 2**32 the first fp16 step must overflow (was the loss scaled?)"
    skipped, norm = r["steps"][-1]
    assert not skipped, r
    assert abs(norm - r["reference_norm"]) <= 5e-2 * r["reference_norm"], r  # unscaled exactly once
