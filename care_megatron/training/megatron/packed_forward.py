"""One THD-packed micro-batch through the Megatron Qwen-VL model: hidden states, log-probs, entropy.

Layout: the packed batch is one sequence of T tokens ([T, 1, H] in Megatron's ``sbhd`` order) with
``PackedSeqParams(qkv_format="thd")`` carrying the document boundaries. The boundaries always end at
T (the padding tail, if any, is its own segment), which makes Megatron's THD RoPE take the per-token
M-RoPE frequencies computed from ``position_ids`` [3, T] instead of restarting positions per
sequence (the "exact mapping" branch of ``_apply_rotary_pos_emb_thd``).

Steps (spec: data flow "training backend, no-grad pass" and "update"):

1. token embeddings (vocab-parallel), image features from the vision tower scattered into the
   ``<|image_pad|>`` rows, sequence-parallel split when enabled -> ``decoder_input``;
2. ``GPTModel.rotary_pos_emb`` (M-RoPE) and ``GPTModel.decoder`` (final norm included);
3. log-probs / entropy of the next token with :func:`logprobs.vocab_parallel_logprobs`, only at
   positions that predict a token of the same sequence, then shifted to ``input_ids`` alignment
   (``care_megatron/data/batch.py``: value at t is log p(ids[t] | ids[:t]); 0 at sequence starts and padding);
4. think embeddings: final hidden states mean-pooled over each sequence's THINK response tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from care_megatron.data.batch import PackedMicroBatch
from care_megatron.training.base import ForwardOutputs
from care_megatron.training.packed_utils import pool_think_hidden
from care_megatron.training.megatron.context_parallel import (ContextParallelLayout, build_layout,
                                                               gather_from_context_parallel)
from care_megatron.training.megatron.logprobs import vocab_parallel_logprobs


@dataclass
class ForwardOptions:
    """Knobs of one packed forward."""

    with_entropy: bool = False
    """Also return per-token entropy."""
    with_think_embeddings: bool = False
    """Also return mean-pooled THINK hidden states [n, H]."""
    logprob_chunk_tokens: int = 2048
    """Tokens per chunk of the fused output-layer + log-softmax (bounds fp32 logits memory)."""
    temperature: float = 1.0
    """Log-probs / entropy of softmax(logits / temperature): the rollout sampling temperature."""

    def __post_init__(self) -> None:
        if self.logprob_chunk_tokens < 1:
            raise ValueError("ForwardOptions.logprob_chunk_tokens must be >= 1")


def segment_boundaries(batch: PackedMicroBatch) -> torch.Tensor:
    """cu_seqlens covering all T tokens: the sequences, then the padding tail as one more segment."""
    cu = batch.cu_seqlens.to(torch.int32)
    total = batch.num_tokens
    if int(cu[-1]) < total:
        cu = torch.cat([cu, cu.new_tensor([total])])
    return cu


def context_parallel_layout(model, batch: PackedMicroBatch, min_total: int = 0) -> ContextParallelLayout | None:
    """The CP layout of ``batch`` on this rank (None without context parallelism).

    Under sequence parallelism the per-rank length must also divide by TP, so the padded total is a
    multiple of ``2 * cp * tp`` (under FP8 ``cp * tp * 16``, or 32 for MXFP8); ``min_total`` pads it
    further (equal lengths across micro-batches)."""
    cp = model.config.context_parallel_size
    if cp == 1:
        return None
    from megatron.core import parallel_state as mps

    from care_megatron.training.megatron.te import fp8_token_alignment, packed_token_multiple

    # each rank's rows (total / cp) must divide by TP under SP and by the FP8 GEMM alignment
    fp8_recipe = model.config.fp8_recipe if model.config.fp8 else None
    per_rank = packed_token_multiple(model.config.tensor_model_parallel_size, model.config.sequence_parallel, fp8_recipe)
    multiple = cp * per_rank * (1 if fp8_token_alignment(fp8_recipe) % 2 == 0 else 2)
    pad_id = 0 if model.facts.image_token_id != 0 else 1
    return build_layout(batch.cu_seqlens, batch.input_ids, batch.position_ids, cp_size=cp,
                        cp_rank=mps.get_context_parallel_rank(), total_multiple=multiple, pad_id=pad_id,
                        min_total=min_total)


def build_packed_seq_params(batch: PackedMicroBatch, device, layout: ContextParallelLayout | None = None):
    """THD params; under CP the *global* padded boundaries (Megatron's RoPE and TE slice per rank)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = segment_boundaries(batch) if layout is None else layout.padded_cu_seqlens
    max_len = int((cu[1:] - cu[:-1]).max())  # read before the copy to the device: no sync on it
    cu = cu.to(device)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                           cu_seqlens_kv_padded=cu, max_seqlen_q=max_len, max_seqlen_kv=max_len)


def prediction_positions(batch: PackedMicroBatch) -> torch.Tensor:
    """Indices t whose hidden state predicts token t+1 of the same sequence (LongTensor)."""
    bounds = batch.cu_seqlens.tolist()
    pieces = [torch.arange(s, e - 1) for s, e in zip(bounds[:-1], bounds[1:]) if e - s > 1]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def _row_view(model, batch: PackedMicroBatch, layout: ContextParallelLayout | None):
    """(token ids of the rows this rank embeds, feature index per row or -1): all T tokens, or under
    CP this rank's chunks of the padded layout. Features are numbered in packed-token order."""
    image_id = model.facts.image_token_id
    ids = batch.input_ids if layout is None else layout.input_ids
    mask = ids == image_id
    feature = torch.where(mask, torch.cumsum(mask.long(), 0) - 1, torch.full_like(ids, -1, dtype=torch.long))
    if layout is None:
        return ids, feature
    return ids.index_select(0, layout.local_index), feature.index_select(0, layout.local_index)


def _image_rows_tensor(model, row_feature: torch.Tensor, features: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[rows, 1, H] zeros with ``features`` in the image-pad rows (sequence-parallel slice when SP)."""
    from megatron.core import tensor_parallel

    rows = (row_feature >= 0).nonzero(as_tuple=True)[0]
    full = torch.zeros(row_feature.numel(), 1, like.shape[-1], dtype=like.dtype, device=like.device)
    full = full.index_put((rows,), features.to(like.dtype).index_select(0, row_feature[rows])[:, None, :])
    if model.config.sequence_parallel:
        # scatter's backward all-gathers, so every TP rank's tower receives the full feature gradient
        full = tensor_parallel.scatter_to_sequence_parallel_region(full)
    return full


def image_mask(model, row_ids: torch.Tensor) -> torch.Tensor:
    """Bool [rows (/tp under SP), 1, 1]: the image-pad rows this rank holds."""
    mask = (row_ids == model.facts.image_token_id)[:, None, None]
    if model.config.sequence_parallel:
        tp = model.config.tensor_model_parallel_size
        from megatron.core import parallel_state as mps

        mask = mask.chunk(tp, dim=0)[mps.get_tensor_model_parallel_rank()]
    return mask


def decoder_input(model, batch: PackedMicroBatch, layout: ContextParallelLayout | None = None):
    """Token embeddings with image features in the pad rows: ([rows (/tp under SP), 1, H], DeepStack list).

    ``rows`` is T, or under CP this rank's T_pad / cp tokens. The vision tower runs on every image of
    the micro-batch on every CP rank (replicated like over TP; its gradients are summed over DP x CP).
    The DeepStack list holds, per early decoder layer, a [rows (/tp), 1, H] tensor that is zero outside
    the image rows (Qwen3-VL; empty for Qwen2.5-VL).
    """
    lm = model.language_model
    row_ids, row_feature = _row_view(model, batch, layout)
    embeddings = lm.embedding(input_ids=row_ids[None], position_ids=None)          # [rows(/tp), 1, H]
    if batch.pixel_values is None or model.vision is None:
        return embeddings, []
    features, deepstack = model.vision(batch.pixel_values, batch.image_grid_thw)   # [N_pad, H]
    count = int((batch.input_ids == model.facts.image_token_id).sum())
    if count != features.shape[0]:
        raise ValueError(f"{count} <|image_pad|> tokens but {features.shape[0]} image features in the "
                         "micro-batch; an image was truncated or image_grid_thw does not match the prompt")
    rows = _image_rows_tensor(model, row_feature, features, embeddings)
    merged = torch.where(image_mask(model, row_ids), rows, embeddings)
    return merged, [_image_rows_tensor(model, row_feature, f, embeddings) for f in deepstack]


def mrope_frequencies(position_ids: torch.Tensor, inv_freq: torch.Tensor, mrope_section) -> torch.Tensor:
    """Qwen2.5-VL (sectioned) M-RoPE angles in Megatron's layout: position_ids [3, T] -> [T, 1, 1, d].

    The same values as ``MultimodalRotaryEmbedding.forward``, for the whole packed length: that module
    slices its output per CP rank in the ``sbhd`` way, whereas THD RoPE under CP needs the full table
    (``_apply_rotary_pos_emb_thd`` picks each sequence's chunks itself).
    """
    angles = position_ids.float()[:, :, None] * inv_freq.float()[None, None, :]   # [3, T, d/2]
    emb = torch.cat([angles, angles], dim=-1)                                    # [3, T, d]
    parts = emb.split(list(mrope_section) * 2, dim=-1)
    return torch.cat([part[i % 3] for i, part in enumerate(parts)], dim=-1)[:, None, None, :]


def interleaved_mrope_frequencies(position_ids: torch.Tensor, inv_freq: torch.Tensor, mrope_section) -> torch.Tensor:
    """Qwen3-VL interleaved M-RoPE angles in Megatron's layout: position_ids [3, T] -> [T, 1, 1, d].

    Frequency j uses the temporal position, except j = 1, 4, 7, ... (< 3 * section[1]) which use the
    height and j = 2, 5, 8, ... (< 3 * section[2]) the width position; then duplicated for the two
    rotated halves (non-interleaved rotary application).
    """
    angles = position_ids.float()[:, :, None] * inv_freq.float()[None, None, :]   # [3, T, d/2]
    combined = angles[0].clone()
    for axis, offset in ((1, 1), (2, 2)):
        index = slice(offset, mrope_section[axis] * 3, 3)
        combined[:, index] = angles[axis][:, index]
    return torch.cat([combined, combined], dim=-1)[:, None, None, :]


def _add_deepstack_hooks(model, deepstack: list):
    """Decoder hook (not a fork): after decoder layer i, add DeepStack feature i at the image rows."""
    layers = model.language_model.decoder.layers
    if len(deepstack) > len(layers):
        raise ValueError(f"{len(deepstack)} DeepStack taps but the first pipeline stage holds {len(layers)} layers")
    handles = []
    for layer, extra in zip(layers, deepstack):
        def hook(module, inputs, output, extra=extra):
            if isinstance(output, tuple):
                return (output[0] + extra,) + tuple(output[1:])
            return output + extra

        handles.append(layer.register_forward_hook(hook))
    return handles


def forward_hidden(model, batch: PackedMicroBatch, layout: ContextParallelLayout | None = None) -> torch.Tensor:
    """Final-norm hidden states of every packed token, [T, H], identical on every TP rank; under
    context parallelism those of this rank's tokens, [T_pad / cp, H] (``layout``: from
    :func:`context_parallel_layout`, computed here when not given).

    On a pipeline stage without the output layer, returns the raw stage output [T (/tp), 1, H]
    instead (what Megatron's schedules send to the next stage); stages after the first read their
    input from ``model.set_input_tensor``.
    """
    from megatron.core import tensor_parallel

    lm = model.language_model
    if layout is None:
        layout = context_parallel_layout(model, batch)
    if (layout is None and model.config.sequence_parallel
            and batch.num_tokens % model.config.tensor_model_parallel_size):
        raise ValueError(f"sequence parallelism needs the packed length ({batch.num_tokens}) divisible by "
                         f"tensor_model_parallel_size; pad the micro-batch")
    hidden, deepstack = decoder_input(model, batch, layout) if lm.pre_process else (None, [])
    position_ids = batch.position_ids if layout is None else layout.position_ids
    if model.facts.mrope_interleaved:
        rotary = interleaved_mrope_frequencies(position_ids, lm.rotary_pos_emb.inv_freq, lm.mrope_section)
    elif layout is not None:
        rotary = mrope_frequencies(position_ids, lm.rotary_pos_emb.inv_freq, lm.mrope_section)
    else:
        rotary = lm.rotary_pos_emb(position_ids[:, None, :], lm.mrope_section)  # [T, 1, 1, d]
    packed = build_packed_seq_params(batch, batch.input_ids.device, layout)
    handles = _add_deepstack_hooks(model, deepstack)
    try:
        hidden = lm.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rotary, packed_seq_params=packed)
    finally:
        for handle in handles:
            handle.remove()
    if not lm.post_process:
        return hidden
    if model.config.sequence_parallel:
        hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
    return hidden[:, 0, :]


def think_embeddings(hidden: torch.Tensor, batch: PackedMicroBatch) -> torch.Tensor:
    """Mean of final hidden states over each sequence's THINK response tokens (all response tokens
    when it has none; zeros when it has no response). hidden [T, H] -> [n, H] fp32, no grad.
    The same pooling as the plain-PyTorch backend (one vectorised pass, no per-sequence sync)."""
    return pool_think_hidden(hidden.detach().float(), batch)


def packed_forward(model, batch: PackedMicroBatch, options: ForwardOptions) -> ForwardOutputs:
    """Forward one packed micro-batch; differentiable log-probs / entropy aligned with ``input_ids``."""
    layout = context_parallel_layout(model, batch)
    hidden = forward_hidden(model, batch, layout)
    return logprobs_from_hidden(model, hidden, batch, options, layout)


def logprobs_from_hidden(model, hidden: torch.Tensor, batch: PackedMicroBatch, options: ForwardOptions,
                         layout: ContextParallelLayout | None = None) -> ForwardOutputs:
    """Last-stage half of :func:`packed_forward`: hidden [T, H] -> ForwardOutputs.

    Under context parallelism ``hidden`` holds this rank's tokens; log-probs / entropy of those tokens
    are computed here and all-gathered, so every CP rank returns the full-length outputs (and computes
    the same loss) while gradients flow only through its own tokens.
    """
    from megatron.core import parallel_state as mps

    if layout is None and model.config.context_parallel_size > 1:
        layout = context_parallel_layout(model, batch)
    if layout is not None:
        return _logprobs_context_parallel(model, hidden, batch, options, layout)
    positions = prediction_positions(batch).to(hidden.device)
    targets = batch.input_ids[positions + 1]
    weight = model.output_weight()
    tp_rank = mps.get_tensor_model_parallel_rank()
    lp, ent = vocab_parallel_logprobs(
        hidden.index_select(0, positions), weight, targets,
        vocab_start=tp_rank * weight.shape[0], vocab_size=model.facts.vocab_size,
        group=mps.get_tensor_model_parallel_group(), chunk_size=options.logprob_chunk_tokens,
        with_entropy=options.with_entropy, reduce_grad_input=not model.config.sequence_parallel,
        temperature=options.temperature)
    total = batch.num_tokens
    logprobs = torch.zeros(total, dtype=torch.float32, device=hidden.device).index_put((positions + 1,), lp)
    entropy = None
    if options.with_entropy:
        entropy = torch.zeros(total, dtype=torch.float32, device=hidden.device).index_put((positions + 1,), ent)
    think = think_embeddings(hidden, batch) if options.with_think_embeddings else None
    return ForwardOutputs(logprobs=logprobs, entropy=entropy, think_embeddings=think)


def _logprobs_context_parallel(model, hidden, batch: PackedMicroBatch, options: ForwardOptions,
                               layout: ContextParallelLayout) -> ForwardOutputs:
    from megatron.core import parallel_state as mps

    device = hidden.device
    group = mps.get_context_parallel_group()
    positions = prediction_positions(batch).to(device)               # t predicts t + 1 (same sequence)
    predicting = layout.orig_to_padded.index_select(0, positions)    # their padded indices
    is_pred = torch.zeros(layout.num_padded_tokens, dtype=torch.bool, device=device)
    is_pred[predicting] = True
    next_ids = torch.roll(layout.input_ids, -1)
    local_rows = is_pred.index_select(0, layout.local_index).nonzero(as_tuple=True)[0]
    weight = model.output_weight()
    tp_rank = mps.get_tensor_model_parallel_rank()
    lp, ent = vocab_parallel_logprobs(
        hidden.index_select(0, local_rows), weight, next_ids.index_select(0, layout.local_index[local_rows]),
        vocab_start=tp_rank * weight.shape[0], vocab_size=model.facts.vocab_size,
        group=mps.get_tensor_model_parallel_group(), chunk_size=options.logprob_chunk_tokens,
        with_entropy=options.with_entropy, reduce_grad_input=not model.config.sequence_parallel,
        temperature=options.temperature)
    total, n_local = batch.num_tokens, hidden.shape[0]

    def to_batch_layout(values):
        local = torch.zeros(n_local, dtype=torch.float32, device=device).index_put((local_rows,), values.float())
        padded = gather_from_context_parallel(local, layout, group)   # value at g: log p(token g+1)
        return torch.zeros(total, dtype=torch.float32, device=device).index_put(
            (positions + 1,), padded.index_select(0, predicting))

    logprobs = to_batch_layout(lp)
    entropy = to_batch_layout(ent) if options.with_entropy else None
    think = None
    if options.with_think_embeddings:
        padded_hidden = gather_from_context_parallel(hidden.detach().float(), layout, group)
        full = torch.zeros(total, hidden.shape[-1], dtype=torch.float32, device=device)
        full[:layout.orig_to_padded.numel()] = padded_hidden.index_select(0, layout.orig_to_padded)
        think = pool_think_hidden(full, batch)
    return ForwardOutputs(logprobs=logprobs, entropy=entropy, think_embeddings=think)
