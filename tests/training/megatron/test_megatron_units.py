"""Single-process unit tests of the Megatron backend's pure pieces (no process group needed)."""
import pytest
import torch

pytest.importorskip("megatron.core")

from care_megatron.config.schema import ParallelConfig  # noqa: E402
from care_megatron.training.megatron import attention, logprobs, parallel_state  # noqa: E402
from care_megatron.training.megatron.backend import offload_storages, restore_storages  # noqa: E402
from care_megatron.training.megatron.cpu_compat import CpuRngStatesTracker  # noqa: E402


# ----------------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("chunk,temperature", [(1, 1.0), (5, 1.0), (64, 1.0), (5, 0.7)])
def test_fused_logprobs_match_full_softmax_values_and_grads(chunk, temperature):
    torch.manual_seed(0)
    n, h, vocab, padded = 23, 16, 37, 48  # rows 37..47 are padding and must not enter the softmax
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(padded, h, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    g_lp, g_ent = torch.randn(n), torch.randn(n)
    lp, ent = logprobs.vocab_parallel_logprobs(hidden, weight, targets, vocab_start=0, vocab_size=vocab,
                                               chunk_size=chunk, with_entropy=True, temperature=temperature)
    (lp * g_lp + ent * g_ent).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref_lp, ref_ent = logprobs.reference_logprobs(hidden, weight, targets, vocab, temperature)
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
    (ref_lp * g_lp + ref_ent * g_ent).sum().backward()
    torch.testing.assert_close(grads[0], hidden.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1], weight.grad, atol=1e-5, rtol=1e-5)
    assert grads[1][vocab:].abs().max() == 0  # padding rows get no gradient


def test_fused_logprobs_rejects_bad_shapes():
    with pytest.raises(ValueError, match="hidden"):
        logprobs.vocab_parallel_logprobs(torch.zeros(3, 4), torch.zeros(5, 6), torch.zeros(3, dtype=torch.long),
                                         vocab_start=0, vocab_size=5)


# ----------------------------------------------------------------------------- attention
def _dense_reference(q, k, v, cu, scale):
    total = q.shape[0]
    doc = torch.repeat_interleave(torch.arange(cu.numel() - 1), (cu[1:] - cu[:-1]).long())
    allowed = (doc[:, None] == doc[None, :]) & torch.ones(total, total, dtype=torch.bool).tril()
    rep = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, kk) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv)


def test_packed_attention_loop_equals_dense_document_mask():
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 6, 14, 20], dtype=torch.int32)
    q, k, v = torch.randn(20, 4, 8), torch.randn(20, 2, 8), torch.randn(20, 2, 8)
    out = attention.packed_causal_attention(q, k, v, cu, 8 ** -0.5, backend="loop")
    torch.testing.assert_close(out, _dense_reference(q, k, v, cu, 8 ** -0.5), atol=1e-5, rtol=1e-5)


def test_packed_attention_flex_eager_equals_loop():
    pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(1)
    cu = torch.tensor([0, 7, 9, 32], dtype=torch.int32)
    q, k, v = torch.randn(32, 4, 8), torch.randn(32, 2, 8), torch.randn(32, 2, 8)
    try:
        out = attention.packed_causal_attention_flex(q, k, v, cu, 8 ** -0.5, compiled=False)
    except Exception as exc:  # flex without compile is not supported on every CPU build
        pytest.skip(f"flex_attention eager unavailable on this CPU build: {exc}")
    torch.testing.assert_close(out, attention.packed_causal_attention_loop(q, k, v, cu, 8 ** -0.5), atol=1e-5, rtol=1e-5)


def test_backend_choice_and_forcing():
    q = torch.zeros(4, 2, 8)
    assert attention.choose_packed_backend(q) == "loop"  # CPU fp32 -> per-document SDPA
    with attention.force_packed_backend("flex"):
        assert attention.choose_packed_backend(q) == "flex"
    assert attention.choose_packed_backend(q) == "loop"
    with pytest.raises(ValueError, match="unknown packed attention backend"):
        with attention.force_packed_backend("dense"):
            pass


# ----------------------------------------------------------------------------- parallel arithmetic
def test_padded_vocab_and_layout_validation():
    assert parallel_state.padded_vocab_size(151936, 1) == 151936
    assert parallel_state.padded_vocab_size(151937, 2) == 152064
    assert parallel_state.padded_vocab_size(300, 2) == 512
    shape = parallel_state.ModelShape(num_layers=4, num_attention_heads=4, num_query_groups=2, hidden_size=64, vocab_size=300)
    assert parallel_state.validate_parallel_layout(ParallelConfig(backend="megatron", tensor_model_parallel_size=2), shape, 8) == 4
    with pytest.raises(ValueError, match="parallel.tensor_model_parallel_size"):
        parallel_state.validate_parallel_layout(ParallelConfig(backend="megatron", tensor_model_parallel_size=4), shape)
    with pytest.raises(ValueError, match="world size"):
        parallel_state.validate_parallel_layout(ParallelConfig(backend="megatron", tensor_model_parallel_size=2), shape, 3)
    with pytest.raises(ValueError, match="pipeline_model_parallel_size"):
        parallel_state.validate_parallel_layout(ParallelConfig(backend="megatron", pipeline_model_parallel_size=8), shape)
    # the interleaved schedule needs more than two stages (2 stages: p2p messages pair up crosswise)
    with pytest.raises(ValueError, match="virtual_pipeline_model_parallel_size"):
        parallel_state.validate_parallel_layout(ParallelConfig(backend="megatron", pipeline_model_parallel_size=2,
                                                               virtual_pipeline_model_parallel_size=2), shape)
    assert parallel_state.validate_parallel_layout(ParallelConfig(backend="megatron", pipeline_model_parallel_size=4,
                                                                  virtual_pipeline_model_parallel_size=1), shape, 4) == 1


def test_layer_placement_per_stage_and_global_names():
    assert parallel_state.layers_per_pipeline_stage(36, 4) == [9, 9, 9, 9]
    assert parallel_state.layers_per_pipeline_stage(36, 4, first_stage_layers=6, last_stage_layers=8) == [6, 11, 11, 8]
    assert parallel_state.layers_per_pipeline_stage(10, 2, virtual_size=2) == [2, 2, 3, 3]
    counts = parallel_state.layers_per_pipeline_stage(8, 2, virtual_size=2)  # [2, 2, 2, 2]
    # interleaved: rank 1's second chunk is model stage 3 -> layers 6, 7
    assert parallel_state.stage_layer_offset(counts, pipeline_rank=1, pipeline_size=2, virtual_rank=1) == 6
    assert parallel_state.global_layer_name("decoder.layers.1.mlp.linear_fc1.weight", 6) == "decoder.layers.7.mlp.linear_fc1.weight"
    assert parallel_state.global_layer_name("output_layer.weight", 6) == "output_layer.weight"
    with pytest.raises(ValueError):
        parallel_state.layers_per_pipeline_stage(3, 4)


def test_context_parallel_split_is_balanced_partition():
    cu = torch.tensor([0, 8, 24])
    parts = [parallel_state.context_parallel_split_indices(cu, 2, r) for r in range(2)]
    assert parts[0].tolist() == [0, 1, 6, 7, 8, 9, 10, 11, 20, 21, 22, 23]
    assert sorted(torch.cat(parts).tolist()) == list(range(24))
    with pytest.raises(ValueError, match="divisible"):
        parallel_state.context_parallel_split_indices(torch.tensor([0, 6]), 2, 0)


# ----------------------------------------------------------------------------- CPU compat, memory
def test_cpu_rng_tracker_forks_named_streams_and_restores_default():
    tracker = CpuRngStatesTracker()
    tracker.add("model-parallel-rng", 1234)
    torch.manual_seed(0)
    with tracker.fork():
        a = torch.rand(3)
    after_default = torch.rand(3)
    torch.manual_seed(0)
    expected_default = torch.rand(3)
    assert torch.equal(after_default, expected_default)  # the default stream was untouched
    with tracker.fork():
        b = torch.rand(3)  # the named stream continued, not restarted
    g = torch.Generator().manual_seed(1234)
    assert torch.equal(a, torch.rand(3, generator=g)) and torch.equal(b, torch.rand(3, generator=g))
    with pytest.raises(KeyError):
        with tracker.fork("missing"):
            pass


def test_offload_and_restore_storages_round_trip_views():
    base = torch.randn(10)
    view = base[2:5]
    expected = base.clone()
    saved = offload_storages([base, view])
    assert len(saved) == 1 and base.untyped_storage().nbytes() == 0
    restore_storages(saved)
    assert torch.equal(base, expected) and torch.equal(view, expected[2:5])


@pytest.mark.parametrize("flavour", ["torch_2_10", "torch_2_11", "torch_2_12"])
def test_varlen_adapter_follows_each_torch_signature(monkeypatch, flavour):
    """The flash-varlen call is built from the installed signature; a fake with each torch
    version's signature (computing with the loop reference) must give the loop's result."""
    import torch.nn.attention.varlen as varlen_module

    def compute(q, k, v, cu, causal, scale):
        assert causal, "causal mask not requested"
        # every version's kernel (aten._flash_attention_forward) takes Hq % Hkv == 0 heads natively
        assert k.shape[1] == v.shape[1] == 2, "K/V heads repeated before the kernel"
        return attention.packed_causal_attention_loop(q, k, v, cu, scale)

    if flavour == "torch_2_10":
        def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
            return compute(query, key, value, cu_seq_q, is_causal, query.shape[-1] ** -0.5)
    elif flavour == "torch_2_11":
        def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
            return compute(query, key, value, cu_seq_q, window_size == (-1, 0), scale)
    else:
        def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                 window_size=(-1, -1), enable_gqa=False):
            if query.shape[1] != key.shape[1] and not enable_gqa:  # torch >= 2.12's own check
                raise ValueError("Expect query and key/value to have the same number of heads")
            return compute(query, key, value, cu_seq_q, window_size == (-1, 0), scale)

    monkeypatch.setattr(varlen_module, "varlen_attn", fake)
    attention._varlen_parameters.cache_clear()
    try:
        torch.manual_seed(2)
        cu = torch.tensor([0, 3, 11, 16], dtype=torch.int32)
        q, k, v = torch.randn(16, 4, 8), torch.randn(16, 2, 8), torch.randn(16, 2, 8)
        out = attention.packed_causal_attention(q, k, v, cu, 8 ** -0.5, backend="varlen")
        torch.testing.assert_close(out, attention.packed_causal_attention_loop(q, k, v, cu, 8 ** -0.5))
    finally:
        attention._varlen_parameters.cache_clear()


# ----------------------------------------------------------------------------- context-parallel layout
def test_context_parallel_layout_pads_sequences_and_gathers_back_in_order():
    from care_megatron.training.megatron.context_parallel import build_layout

    cu = torch.tensor([0, 5, 12, 13], dtype=torch.int32)      # 3 sequences, then a 3-token padding tail
    ids = torch.arange(16) + 100
    pos = torch.stack([torch.arange(16), torch.arange(16) * 2, torch.arange(16) * 3])
    layouts = [build_layout(cu, ids, pos, cp_size=2, cp_rank=r, total_multiple=8) for r in range(2)]
    lay = layouts[0]
    assert lay.padded_cu_seqlens.tolist() == [0, 8, 16, 20, 24]   # 5->8, 7->8, 1->4, tail 4 (total % 8)
    assert lay.orig_to_padded.tolist() == [0, 1, 2, 3, 4, 8, 9, 10, 11, 12, 13, 14, 16]
    assert torch.equal(lay.input_ids[lay.orig_to_padded], ids[:13])
    assert lay.input_ids[[5, 6, 7, 15, 17, 23]].tolist() == [0] * 6
    assert torch.equal(lay.position_ids[:, lay.orig_to_padded], pos[:, :13])
    # pads continue their sequence (last + 1, + 2, ...); the tail segment holds 0
    assert lay.position_ids[0, 5:8].tolist() == [5, 6, 7] and lay.position_ids[2, 5:8].tolist() == [13, 14, 15]
    assert lay.position_ids[0, 15].tolist() == 12 and lay.position_ids[0, 20:].tolist() == [0] * 4
    # each rank holds chunks r and 2cp-1-r of every segment; the ranks partition the layout
    assert lay.local_index.tolist() == [0, 1, 6, 7, 8, 9, 14, 15, 16, 19, 20, 23]
    rows = torch.cat([lay_r.local_index for lay_r in layouts])
    assert torch.equal(rows[lay.gather_order], torch.arange(24))
    with pytest.raises(ValueError, match="2 \\* cp_size"):
        build_layout(cu, ids, pos, cp_size=2, cp_rank=0, total_multiple=6)
    # min_total (equal lengths for the interleaved schedule) only lengthens the tail segment
    longer = build_layout(cu, ids, pos, cp_size=2, cp_rank=0, total_multiple=8, min_total=40)
    assert longer.padded_cu_seqlens.tolist() == [0, 8, 16, 20, 40]
    assert torch.equal(longer.orig_to_padded, lay.orig_to_padded)


@pytest.mark.parametrize("cp", [2, 3])
def test_context_parallel_layout_matches_megatron_thd_rope_slicing(cp):
    """The rows a rank holds are exactly the rows Megatron's THD RoPE gives it frequencies for."""
    from megatron.core.models.common.embeddings.rope_utils import _get_thd_freqs_on_this_cp_rank

    from care_megatron.training.megatron.context_parallel import build_layout

    cu = torch.tensor([0, 7, 9, 30], dtype=torch.int32)
    ids, pos = torch.arange(30), torch.zeros(3, 30, dtype=torch.long)
    for rank in range(cp):
        lay = build_layout(cu, ids, pos, cp_size=cp, cp_rank=rank, total_multiple=2 * cp)
        table = torch.arange(lay.num_padded_tokens)[:, None, None, None]   # row g holds g
        bounds = lay.padded_cu_seqlens.tolist()
        picked = torch.cat([_get_thd_freqs_on_this_cp_rank(rank, cp, torch.empty((e - s) // cp), table, s)
                            for s, e in zip(bounds[:-1], bounds[1:])])
        assert picked.flatten().tolist() == lay.local_index.tolist()


def test_mrope_frequencies_equal_megatron_multimodal_rotary(monkeypatch):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding

    from care_megatron.training.megatron.packed_forward import mrope_frequencies

    # the module places inv_freq on torch.cuda.current_device(); patched for this test only, so a
    # GPU run of the whole suite keeps its real device afterwards
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    rope = MultimodalRotaryEmbedding(kv_channels=16, rotary_percent=1.0, rotary_base=10000)
    section = [2, 3, 3]
    position_ids = torch.randint(0, 50, (3, 21))
    expected = rope(position_ids[:, None, :], section)
    torch.testing.assert_close(mrope_frequencies(position_ids, rope.inv_freq, section), expected, atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["loop", "flex"])
@pytest.mark.parametrize("cp", [2, 3])
def test_context_parallel_local_attention_equals_full_attention_rows(backend, cp):
    """Each CP rank's queries against the gathered keys give exactly the rows of full per-document
    causal attention it holds (no communication: the compute half of the CP attention)."""
    from care_megatron.training.megatron.context_parallel import build_layout, local_queries_attention

    torch.manual_seed(0)
    cu = torch.tensor([0, 9, 10, 31], dtype=torch.int32)
    lay0 = build_layout(cu, torch.zeros(31, dtype=torch.long), torch.zeros(3, 31, dtype=torch.long), cp_size=cp,
                        cp_rank=0, total_multiple=2 * cp)
    total = lay0.num_padded_tokens
    q, k, v = torch.randn(total, 4, 8), torch.randn(total, 2, 8), torch.randn(total, 2, 8)
    full = attention.packed_causal_attention_loop(q, k, v, lay0.padded_cu_seqlens, 0.3)
    bounds = tuple(lay0.padded_cu_seqlens.tolist())
    for rank in range(cp):
        lay = build_layout(cu, torch.zeros(31, dtype=torch.long), torch.zeros(3, 31, dtype=torch.long), cp_size=cp,
                           cp_rank=rank, total_multiple=2 * cp)
        rows = lay.local_index
        out = local_queries_attention(q[rows], k, v, bounds, cp, rank, 0.3, backend=backend)
        torch.testing.assert_close(out, full[rows], atol=1e-5, rtol=1e-5)
