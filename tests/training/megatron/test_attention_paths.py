"""Packed attention's GPU paths, the parts that run on CPU: the compiled flex_attention's per-kind
compile caches and its refusal of the eager fallback (no-grad: flex has no CPU backward), and the
known ``max_seqlen`` reaching the varlen kernel without a host sync."""
import pytest
import torch

pytest.importorskip("megatron.core")

from care_megatron.training.megatron import attention, compiled_flex  # noqa: E402


def _flex_inputs(total, requires_grad=False):
    g = torch.Generator().manual_seed(total)
    q, k, v = (torch.randn(1, heads, total, 8, generator=g, requires_grad=requires_grad) for heads in (4, 2, 2))
    cu = torch.tensor([0, total // 3, total], dtype=torch.int32)
    return q, k, v, cu


def _run(flex, total):
    q, k, v, cu = _flex_inputs(total)
    out = flex(q, k, v, block_mask=attention.document_block_mask(cu, total, "cpu"), scale=8 ** -0.5, enable_gqa=True)
    expected = attention.packed_causal_attention_loop(*(x[0].transpose(0, 1) for x in (q, k, v)), cu, 8 ** -0.5)
    torch.testing.assert_close(out[0].transpose(0, 1), expected, atol=1e-5, rtol=1e-5)


def test_compiled_flex_compiles_twice_for_three_lengths_and_refuses_the_eager_fallback():
    flex = compiled_flex.CompiledFlexAttention(backend="eager")  # dynamo's caching and guards, no inductor build
    with torch.no_grad():
        for total in (96, 160, 224):
            _run(flex, total)
    assert flex.compilations("no_grad_square") == 2  # static first, then one dynamic graph for every length
    assert flex.compilations("train_square") == 0
    limited = compiled_flex.CompiledFlexAttention(backend="eager")
    with torch._dynamo.config.patch(recompile_limit=1), torch.no_grad():
        _run(limited, 96)
        with pytest.raises(RuntimeError, match="refusing torch's eager fallback"):
            _run(limited, 160)


def test_compiled_flex_kinds_have_their_own_caches():
    q, k, _, _ = _flex_inputs(12, requires_grad=True)
    assert compiled_flex.CompiledFlexAttention.kind(q, k) == "train_square"
    assert compiled_flex.CompiledFlexAttention.kind(q[:, :, :4], k) == "train_rectangular"
    with torch.no_grad():
        assert compiled_flex.CompiledFlexAttention.kind(q, k) == "no_grad_square"
    assert compiled_flex.compiled_flex_attention() is compiled_flex.compiled_flex_attention()


def test_core_attention_passes_the_known_max_seqlen_and_unrepeated_kv(monkeypatch):
    from megatron.core.packed_seq_params import PackedSeqParams

    seen = {}

    def fake_varlen(q, k, v, cu_seqlens, scale, max_seqlen=None):
        seen.update(max_seqlen=max_seqlen, kv_heads=k.shape[1])
        return attention.packed_causal_attention_loop(q, k, v, cu_seqlens, scale)

    monkeypatch.setattr(attention, "packed_causal_attention_varlen", fake_varlen)
    core = attention.TorchCoreAttention.__new__(attention.TorchCoreAttention)
    torch.nn.Module.__init__(core)
    core.cp_size, core.softmax_scale = 1, 8 ** -0.5
    core.attn_mask_type = attention.AttnMaskType.causal
    cu = torch.tensor([0, 5, 16], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=11, max_seqlen_kv=11)
    q, k, v = torch.randn(16, 4, 8), torch.randn(16, 2, 8), torch.randn(16, 2, 8)
    with attention.force_packed_backend("varlen"):
        out = core(q, k, v, None, packed_seq_params=params)
    assert seen == {"max_seqlen": 11, "kv_heads": 2}
    torch.testing.assert_close(out, attention.packed_causal_attention_loop(q, k, v, cu, 8 ** -0.5).reshape(16, -1))
