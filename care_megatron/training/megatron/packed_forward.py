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


def build_packed_seq_params(batch: PackedMicroBatch, device):
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = segment_boundaries(batch).to(device)
    max_len = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                           cu_seqlens_kv_padded=cu, max_seqlen_q=max_len, max_seqlen_kv=max_len)


def prediction_positions(batch: PackedMicroBatch) -> torch.Tensor:
    """Indices t whose hidden state predicts token t+1 of the same sequence (LongTensor)."""
    bounds = batch.cu_seqlens.tolist()
    pieces = [torch.arange(s, e - 1) for s, e in zip(bounds[:-1], bounds[1:]) if e - s > 1]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def _image_rows_tensor(model, batch: PackedMicroBatch, features: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[T, 1, H] zeros with ``features`` in the image-pad rows (sequence-parallel slice when SP)."""
    from megatron.core import tensor_parallel

    ids = batch.input_ids
    mask = ids == model.facts.image_token_id
    full = torch.zeros(ids.numel(), 1, like.shape[-1], dtype=like.dtype, device=like.device)
    full = full.index_put((mask.nonzero(as_tuple=True)[0],), features.to(like.dtype)[:, None, :])
    if model.config.sequence_parallel:
        # scatter's backward all-gathers, so every TP rank's tower receives the full feature gradient
        full = tensor_parallel.scatter_to_sequence_parallel_region(full)
    return full


def image_mask(model, batch: PackedMicroBatch, like: torch.Tensor) -> torch.Tensor:
    """Bool [T (/tp under SP), 1, 1]: the image-pad rows this rank holds."""
    mask = (batch.input_ids == model.facts.image_token_id)[:, None, None]
    if model.config.sequence_parallel:
        tp = model.config.tensor_model_parallel_size
        from megatron.core import parallel_state as mps

        mask = mask.chunk(tp, dim=0)[mps.get_tensor_model_parallel_rank()]
    return mask


def decoder_input(model, batch: PackedMicroBatch):
    """Token embeddings with image features in the pad rows: ([T (/tp under SP), 1, H], DeepStack list).

    The DeepStack list holds, per early decoder layer, a [T (/tp), 1, H] tensor that is zero outside
    the image rows (Qwen3-VL; empty for Qwen2.5-VL).
    """
    lm = model.language_model
    ids = batch.input_ids
    embeddings = lm.embedding(input_ids=ids[None], position_ids=None)          # [T(/tp), 1, H]
    if batch.pixel_values is None or model.vision is None:
        return embeddings, []
    features, deepstack = model.vision(batch.pixel_values, batch.image_grid_thw)   # [N_pad, H]
    count = int((ids == model.facts.image_token_id).sum())
    if count != features.shape[0]:
        raise ValueError(f"{count} <|image_pad|> tokens but {features.shape[0]} image features in the "
                         "micro-batch; an image was truncated or image_grid_thw does not match the prompt")
    rows = _image_rows_tensor(model, batch, features, embeddings)
    merged = torch.where(image_mask(model, batch, embeddings), rows, embeddings)
    return merged, [_image_rows_tensor(model, batch, f, embeddings) for f in deepstack]


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


def forward_hidden(model, batch: PackedMicroBatch) -> torch.Tensor:
    """Final-norm hidden states of every packed token, [T, H], identical on every TP rank.

    On a pipeline stage without the output layer, returns the raw stage output [T (/tp), 1, H]
    instead (what Megatron's schedules send to the next stage); stages after the first read their
    input from ``model.set_input_tensor``.
    """
    from megatron.core import tensor_parallel

    lm = model.language_model
    if model.config.sequence_parallel and batch.num_tokens % model.config.tensor_model_parallel_size:
        raise ValueError(f"sequence parallelism needs the packed length ({batch.num_tokens}) divisible by "
                         f"tensor_model_parallel_size; pad the micro-batch")
    hidden, deepstack = decoder_input(model, batch) if lm.pre_process else (None, [])
    if model.facts.mrope_interleaved:
        rotary = interleaved_mrope_frequencies(batch.position_ids, lm.rotary_pos_emb.inv_freq, lm.mrope_section)
    else:
        rotary = lm.rotary_pos_emb(batch.position_ids[:, None, :], lm.mrope_section)  # [T, 1, 1, d]
    packed = build_packed_seq_params(batch, batch.input_ids.device)
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
    hidden = forward_hidden(model, batch)
    return logprobs_from_hidden(model, hidden, batch, options)


def logprobs_from_hidden(model, hidden: torch.Tensor, batch: PackedMicroBatch, options: ForwardOptions) -> ForwardOutputs:
    """Last-stage half of :func:`packed_forward`: hidden [T, H] -> ForwardOutputs."""
    from megatron.core import parallel_state as mps

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
