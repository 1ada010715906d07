"""M-RoPE positions and THD packing of variable-length sequences under a token budget.

* :func:`mrope_position_ids` gives the ``[3, L]`` (temporal, height, width) rotary positions of one
  Qwen-VL sequence, equal to what transformers' ``get_rope_index`` computes for that sequence alone.
* :func:`pack_sequences` concatenates :class:`~care_megatron.data.batch.Sequence` objects into
  :class:`~care_megatron.data.batch.PackedMicroBatch` objects (one token axis, ``cu_seqlens``
  boundaries, positions restarting per sequence) without ever splitting a sequence, with balanced
  token counts across micro-batches.
* :func:`pack_for_data_parallel` first splits the sequences across data-parallel ranks with the
  Karmarkar-Karp largest-differencing method (balanced tokens per rank), then packs each rank's share
  into the same number of micro-batches, so every rank runs the same number of forward/backward
  passes (collectives stay in lock-step).
* :func:`unpack` and :func:`restore_order` undo packing exactly.

Loss normalisers (token / sequence counts) are *not* computed here: they are global-batch constants
the caller computes once (ARCHITECTURE.md, Boundaries), so packing never changes a loss value.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any, Sequence as SequenceType

import torch

from care_megatron.data.batch import PackedMicroBatch, Sequence
from care_megatron.rewards.regions import Region

MROPE_ARCHS = ("qwen2_5_vl", "qwen3_vl")


# ----------------------------------------------------------------------------------------------
# M-RoPE positions
# ----------------------------------------------------------------------------------------------

def mrope_position_ids(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, spatial_merge_size: int,
                       image_token_id: int, vision_start_token_id: int, arch: str = "qwen2_5_vl") -> torch.Tensor:
    """M-RoPE positions of one sequence: LongTensor[3, L] (rows: temporal, height, width).

    ``input_ids``: LongTensor[L]; ``image_grid_thw``: LongTensor[n_images, 3] patch grids (before
    the merge) of the images in the order their ``<|image_pad|>`` blocks appear, or None.

    Text tokens get the same position on all three rows, counting up by one. An image with merged
    grid ``(t, h', w') = (t, h / m, w / m)`` whose block starts at running position ``p`` occupies
    ``t * h' * w'`` consecutive tokens with positions ``(p + i, p + j, p + k)`` for the (i, j, k)
    grid cell in row-major order; the text after it continues at ``p + max(h', w')``. This is the
    Qwen2-VL paper's rule and what transformers 5.17's ``Qwen2_5_VLModel.get_rope_index`` and
    ``Qwen3VLModel.get_rope_index`` compute for still images (Qwen3-VL differs only for videos,
    which it splits per frame with timestamps, and in how its rotary embedding interleaves the three
    frequency sections, which happens after these ids). ``arch`` is accepted for that reason and
    validated; both families take this path.

    Each image block must be contiguous and follow a ``<|vision_start|>`` token; a count of image
    tokens that disagrees with the grids (e.g. a response that sampled ``<|image_pad|>``) raises
    ValueError, as the HF model itself would fail on it.
    """
    if arch not in MROPE_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(MROPE_ARCHS)}")
    ids = input_ids.reshape(-1)
    length = int(ids.numel())
    device = ids.device
    grids = [] if image_grid_thw is None else [tuple(int(v) for v in row) for row in image_grid_thw.reshape(-1, 3).tolist()]
    image_positions = torch.nonzero(ids == image_token_id).flatten().tolist()
    merge = int(spatial_merge_size)
    counts = []
    for i, (t, h, w) in enumerate(grids):
        if h % merge or w % merge:
            raise ValueError(f"image {i}: grid {t}x{h}x{w} is not divisible by spatial_merge_size {merge}")
        counts.append(t * (h // merge) * (w // merge))
    if len(image_positions) != sum(counts):
        raise ValueError(f"sequence holds {len(image_positions)} image tokens (id {image_token_id}) but its "
                         f"{len(grids)} image grid(s) need {sum(counts)}; responses must not contain image tokens")
    if not grids:
        return torch.arange(length, device=device, dtype=torch.long).unsqueeze(0).expand(3, -1).clone()

    pieces = []
    cursor = 0  # next token index not yet given a position
    position = 0  # next text position
    consumed = 0  # image tokens already placed
    for i, ((t, h, w), count) in enumerate(zip(grids, counts)):
        start = image_positions[consumed]
        if image_positions[consumed + count - 1] != start + count - 1:
            raise ValueError(f"image {i}: its {count} image tokens starting at {start} are not contiguous")
        if start == 0 or int(ids[start - 1]) != vision_start_token_id:
            raise ValueError(f"image {i}: the image block at token {start} does not follow <|vision_start|> "
                             f"(id {vision_start_token_id})")
        text_len = start - cursor
        if text_len:
            pieces.append(torch.arange(position, position + text_len, device=device).unsqueeze(0).expand(3, -1))
            position += text_len
        grid_h, grid_w = h // merge, w // merge
        temporal = torch.arange(t, device=device).view(t, 1, 1).expand(t, grid_h, grid_w)
        rows = torch.arange(grid_h, device=device).view(1, grid_h, 1).expand(t, grid_h, grid_w)
        cols = torch.arange(grid_w, device=device).view(1, 1, grid_w).expand(t, grid_h, grid_w)
        pieces.append(torch.stack([temporal, rows, cols]).reshape(3, -1) + position)
        position += max(grid_h, grid_w)
        cursor = start + count
        consumed += count
    if cursor < length:
        pieces.append(torch.arange(position, position + length - cursor, device=device).unsqueeze(0).expand(3, -1))
    return torch.cat(pieces, dim=1).long()


@dataclass
class MRopeSpec:
    """What :func:`mrope_position_ids` needs besides a sequence; read once from the model config."""

    spatial_merge_size: int = 2
    """Vision tower's spatial merge (``vision_config.spatial_merge_size``)."""
    image_token_id: int = -1
    """``<|image_pad|>`` id (``config.image_token_id``)."""
    vision_start_token_id: int = -1
    """``<|vision_start|>`` id (``config.vision_start_token_id``)."""
    arch: str = "qwen2_5_vl"
    """``qwen2_5_vl`` or ``qwen3_vl``."""

    def __post_init__(self) -> None:
        if self.spatial_merge_size < 1:
            raise ValueError(f"spatial_merge_size must be >= 1, got {self.spatial_merge_size}")
        if self.arch not in MROPE_ARCHS:
            raise ValueError(f"arch must be one of {MROPE_ARCHS}, got {self.arch!r}")

    @classmethod
    def from_hf_config(cls, hf_config) -> "MRopeSpec":
        """From a transformers Qwen2.5-VL / Qwen3-VL config."""
        return cls(spatial_merge_size=int(hf_config.vision_config.spatial_merge_size),
                   image_token_id=int(hf_config.image_token_id),
                   vision_start_token_id=int(hf_config.vision_start_token_id),
                   arch=str(hf_config.model_type))

    def positions(self, sequence: Sequence) -> torch.Tensor:
        """``sequence.position_ids`` if set, else computed; LongTensor[3, L]."""
        if sequence.position_ids is not None:
            return sequence.position_ids
        has_images = sequence.image_grid_thw is not None and sequence.image_grid_thw.numel() > 0
        if has_images and (self.image_token_id < 0 or self.vision_start_token_id < 0):
            raise ValueError("a sequence has images but no MRopeSpec (image_token_id / vision_start_token_id) "
                             "was given to compute its M-RoPE positions; pass mrope=MRopeSpec.from_hf_config(config)")
        if not has_images:
            return torch.arange(len(sequence)).unsqueeze(0).expand(3, -1).clone()
        return mrope_position_ids(sequence.input_ids, sequence.image_grid_thw, self.spatial_merge_size,
                                  self.image_token_id, self.vision_start_token_id, self.arch)


# ----------------------------------------------------------------------------------------------
# Assigning sequences to bins
# ----------------------------------------------------------------------------------------------

def _round_down(value: int, multiple: int) -> int:
    return (value // multiple) * multiple


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def first_fit_decreasing(lengths: SequenceType[int], capacity: int) -> list[list[int]]:
    """Bins (lists of indices into ``lengths``) from first-fit decreasing; each bin's sum <= capacity."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in order:
        for b, load in enumerate(loads):
            if load + lengths[i] <= capacity:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    return bins


def _balanced_fit(lengths: SequenceType[int], capacity: int, num_bins: int) -> list[list[int]] | None:
    """Longest-first into the least-loaded bin that fits; None if some sequence fits no bin."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    loads = [0] * num_bins
    for i in order:
        candidates = [b for b in range(num_bins) if loads[b] + lengths[i] <= capacity]
        if not candidates:
            return None
        best = min(candidates, key=lambda b: (loads[b], b))
        bins[best].append(i)
        loads[best] += lengths[i]
    return bins


def balanced_bins(lengths: SequenceType[int], capacity: int, min_bins: int = 1) -> list[list[int]]:
    """Partition indices into the fewest bins (at least ``min_bins``) with sums <= ``capacity``, balanced.

    The bin count starts at first-fit decreasing's (near-minimal) count; the assignment puts each
    sequence, longest first, into the least-loaded bin with room, adding a bin when none has room.
    Within a bin, indices keep their input order (deterministic, and keeps a prompt's group together).
    """
    if not lengths:
        return [[] for _ in range(min_bins)]
    num_bins = max(min_bins, len(first_fit_decreasing(lengths, capacity)))
    while True:
        bins = _balanced_fit(lengths, capacity, num_bins)
        if bins is not None:
            return [sorted(b) for b in bins]
        num_bins += 1


def karmarkar_karp(lengths: SequenceType[int], num_parts: int) -> list[list[int]]:
    """Split indices into ``num_parts`` parts with near-equal sums (largest differencing method).

    Each item starts as a partial solution with one non-empty part; repeatedly the two partial
    solutions with the largest spread are combined, pairing the heaviest part of one with the
    lightest part of the other. Parts come back sorted by index; deterministic for equal inputs.
    """
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    heap = []
    for i, length in enumerate(lengths):
        parts = [[i]] + [[] for _ in range(num_parts - 1)]
        sums = [int(length)] + [0] * (num_parts - 1)
        # Key: (-spread, tie-break on first index) so the widest partial solution pops first.
        heapq.heappush(heap, (-int(length), i, sums, parts))
    if not heap:
        return [[] for _ in range(num_parts)]
    while len(heap) > 1:
        _, tie_a, sums_a, parts_a = heapq.heappop(heap)
        _, tie_b, sums_b, parts_b = heapq.heappop(heap)
        order_a = sorted(range(num_parts), key=lambda k: (-sums_a[k], k))  # heaviest first
        order_b = sorted(range(num_parts), key=lambda k: (sums_b[k], k))  # lightest first
        sums = [sums_a[a] + sums_b[b] for a, b in zip(order_a, order_b)]
        parts = [parts_a[a] + parts_b[b] for a, b in zip(order_a, order_b)]
        heapq.heappush(heap, (-(max(sums) - min(sums)), min(tie_a, tie_b), sums, parts))
    _, _, sums, parts = heap[0]
    parts = [sorted(p) for p in parts]
    return sorted(parts, key=lambda p: (p[0] if p else float("inf")))


# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------

def _concat_micro_batch(sequences: SequenceType[Sequence], indices: list[int], positions: list[torch.Tensor],
                        pad_multiple: int, pad_token_id: int) -> PackedMicroBatch:
    chosen = [sequences[i] for i in indices]
    lengths = [len(s) for s in chosen]
    total = sum(lengths)
    padded = max(_round_up(total, pad_multiple), pad_multiple if total == 0 else 0)
    num_pad = padded - total

    def cat(tensors: list[torch.Tensor], fill, dtype: torch.dtype) -> torch.Tensor:
        body = torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.zeros(0, dtype=dtype)
        return torch.cat([body.to(dtype), torch.full((num_pad,), fill, dtype=dtype)])

    input_ids = cat([s.input_ids for s in chosen], pad_token_id, torch.long)
    loss_mask = cat([s.loss_mask for s in chosen], False, torch.bool)
    region_ids = cat([s.region_ids for s in chosen], int(Region.OTHER), torch.long)
    # Padding gets positions 0..num_pad-1: a "sequence" of its own, so position-based packed masks
    # (transformers' find_packed_sequence_indices) never attach it to the last real sequence.
    pad_positions = torch.arange(num_pad).unsqueeze(0).expand(3, -1)
    position_ids = torch.cat([p.long() for p in positions] + [pad_positions], dim=1) if positions or num_pad else \
        torch.zeros(3, 0, dtype=torch.long)
    cu_seqlens = torch.zeros(len(chosen) + 1, dtype=torch.int32)
    if lengths:
        cu_seqlens[1:] = torch.tensor(lengths).cumsum(0).to(torch.int32)

    keys = set()
    for s in chosen:
        keys.update(s.token_fields)
    token_fields = {}
    for key in sorted(keys):
        missing = [i for i, s in zip(indices, chosen) if key not in s.token_fields]
        if missing:
            raise ValueError(f"token_fields[{key!r}] is missing on sequence(s) {missing}; every packed sequence "
                             "must carry the same per-token fields")
        values = [s.token_fields[key] for s in chosen]
        token_fields[key] = cat(values, 0, values[0].dtype)

    pixel_chunks = [s.pixel_values for s in chosen if s.pixel_values is not None and s.pixel_values.numel()]
    grid_chunks = [s.image_grid_thw for s in chosen if s.image_grid_thw is not None and s.image_grid_thw.numel()]
    return PackedMicroBatch(
        input_ids=input_ids, position_ids=position_ids, cu_seqlens=cu_seqlens, loss_mask=loss_mask,
        region_ids=region_ids, sequence_indices=torch.tensor(indices, dtype=torch.long),
        pixel_values=torch.cat(pixel_chunks) if pixel_chunks else None,
        image_grid_thw=torch.cat([g.reshape(-1, 3).long() for g in grid_chunks]) if grid_chunks else None,
        token_fields=token_fields, num_pad=num_pad,
    )


def _validate(sequences: SequenceType[Sequence], capacity: int, token_budget: int, pad_multiple: int) -> list[int]:
    if token_budget < 1 or pad_multiple < 1:
        raise ValueError(f"token_budget ({token_budget}) and pad_multiple ({pad_multiple}) must be >= 1")
    if capacity < 1:
        raise ValueError(f"token_budget {token_budget} is smaller than pad_multiple {pad_multiple}")
    lengths = []
    for i, s in enumerate(sequences):
        n = len(s)
        if n == 0:
            raise ValueError(f"sequence {i} is empty")
        if n > capacity:
            raise ValueError(f"sequence {i} has {n} tokens, more than the micro-batch token budget {token_budget}"
                             + (f" (rounded down to pad_multiple {pad_multiple}: {capacity})" if capacity != token_budget else "")
                             + "; raise train.micro_batch_tokens or shorten prompts/responses (never truncated silently)")
        for name in ("loss_mask", "region_ids"):
            if getattr(s, name).numel() != n:
                raise ValueError(f"sequence {i}: {name} has {getattr(s, name).numel()} entries for {n} tokens")
        for key, value in s.token_fields.items():
            if value.numel() != n:
                raise ValueError(f"sequence {i}: token_fields[{key!r}] has {value.numel()} entries for {n} tokens")
        if s.position_ids is not None and tuple(s.position_ids.shape) != (3, n):
            raise ValueError(f"sequence {i}: position_ids has shape {tuple(s.position_ids.shape)}, expected (3, {n})")
        lengths.append(n)
    return lengths


def pack_sequences(sequences: SequenceType[Sequence], token_budget: int, pad_multiple: int = 1,
                   mrope: MRopeSpec | None = None, min_micro_batches: int = 1, pad_token_id: int = 0,
                   indices: SequenceType[int] | None = None) -> list[PackedMicroBatch]:
    """Pack sequences into THD micro-batches of at most ``token_budget`` tokens (padding included).

    No sequence is split or truncated: one longer than the budget (rounded down to ``pad_multiple``)
    raises ValueError naming its index and length. Micro-batch count: the fewest that first-fit
    decreasing finds (at least ``min_micro_batches``; extra ones are all padding when there are
    fewer sequences), with tokens balanced across them. Each micro-batch's length is a multiple of
    ``pad_multiple`` (TP x CP needs it); the ``num_pad`` padding tokens sit after the last sequence,
    with ``pad_token_id``, ``loss_mask`` False, region OTHER and zero ``token_fields``.

    ``position_ids`` [3, T] restart at 0 per sequence: a sequence's own ``position_ids`` if set,
    else :func:`mrope_position_ids` via ``mrope`` (required when a sequence has images).
    ``sequence_indices`` hold each packed sequence's index in ``sequences`` (or ``indices[i]`` when
    ``indices`` maps local to global positions, as :func:`pack_for_data_parallel` does); the order
    is deterministic for the same input.
    """
    capacity = _round_down(token_budget, pad_multiple)
    lengths = _validate(sequences, capacity, token_budget, pad_multiple)
    spec = mrope or MRopeSpec()
    positions = [spec.positions(s) for s in sequences]
    bins = balanced_bins(lengths, capacity, min_bins=min_micro_batches)
    global_index = list(range(len(sequences))) if indices is None else [int(i) for i in indices]
    if len(global_index) != len(sequences):
        raise ValueError(f"indices has {len(global_index)} entries for {len(sequences)} sequences")
    packed = []
    for members in sorted(bins, key=lambda b: (b[0] if b else float("inf"))):
        mb = _concat_micro_batch(sequences, members, [positions[i] for i in members], pad_multiple, pad_token_id)
        mb.sequence_indices = torch.tensor([global_index[i] for i in members], dtype=torch.long)
        packed.append(mb)
    return packed


def pack_for_data_parallel(sequences: SequenceType[Sequence], num_dp_ranks: int, token_budget: int,
                           pad_multiple: int = 1, mrope: MRopeSpec | None = None,
                           pad_token_id: int = 0) -> list[list[PackedMicroBatch]]:
    """Per data-parallel rank, its micro-batches: ``result[rank]`` is what rank ``rank`` trains on.

    Sequences are split across ranks by :func:`karmarkar_karp` on token counts, then each share is
    packed with :func:`pack_sequences`; all ranks get the same number of micro-batches (the largest
    any rank needs; padding-only micro-batches fill a rank with too few sequences). ``sequence_indices``
    refer to positions in ``sequences`` (the global list).
    """
    if num_dp_ranks < 1:
        raise ValueError(f"num_dp_ranks must be >= 1, got {num_dp_ranks}")
    capacity = _round_down(token_budget, pad_multiple)
    lengths = _validate(sequences, capacity, token_budget, pad_multiple)
    shares = karmarkar_karp(lengths, num_dp_ranks)
    counts = [len(balanced_bins([lengths[i] for i in share], capacity)) if share else 1 for share in shares]
    target = max(counts)
    return [pack_sequences([sequences[i] for i in share], token_budget, pad_multiple, mrope=mrope,
                           min_micro_batches=target, pad_token_id=pad_token_id, indices=share)
            for share in shares]


# ----------------------------------------------------------------------------------------------
# Undoing packing
# ----------------------------------------------------------------------------------------------

def unpack(micro_batch: PackedMicroBatch, per_token: torch.Tensor, dim: int = -1) -> list[torch.Tensor]:
    """Split a per-token tensor of a micro-batch back into its sequences (padding dropped).

    ``per_token``: any tensor whose dimension ``dim`` has size T (e.g. log-probs [T], hidden states
    [T, H] with ``dim=0``, positions [3, T]). Returns ``num_sequences`` tensors (views), sequence k
    of length ``cu_seqlens[k+1] - cu_seqlens[k]`` along ``dim``, in micro-batch order.
    """
    size = per_token.shape[dim]
    if size != micro_batch.num_tokens:
        raise ValueError(f"tensor has {size} entries along dim {dim}; the micro-batch has {micro_batch.num_tokens} tokens")
    bounds = micro_batch.cu_seqlens.tolist()
    return [per_token.narrow(dim, bounds[k], bounds[k + 1] - bounds[k]) for k in range(len(bounds) - 1)]


def restore_order(micro_batches: SequenceType[PackedMicroBatch], per_sequence: SequenceType[SequenceType[Any]],
                  num_sequences: int | None = None) -> list[Any]:
    """Put per-sequence results back in the original sequence order.

    ``per_sequence[b][k]`` is the result for sequence k of ``micro_batches[b]`` (e.g. from
    :func:`unpack`). Returns a list where entry i belongs to the sequence with ``sequence_indices``
    value i. Raises ValueError if an index is missing or repeated (``num_sequences``: expected
    total, default the number of packed sequences).
    """
    pairs = []
    for mb, results in zip(micro_batches, per_sequence, strict=True):
        if len(results) != mb.num_sequences:
            raise ValueError(f"{len(results)} results for a micro-batch of {mb.num_sequences} sequences")
        pairs.extend(zip(mb.sequence_indices.tolist(), results))
    total = len(pairs) if num_sequences is None else num_sequences
    out: list[Any] = [None] * total
    seen = set()
    for index, result in pairs:
        if index in seen or not 0 <= index < total:
            raise ValueError(f"sequence index {index} repeated or out of range [0, {total})")
        seen.add(index)
        out[index] = result
    if len(seen) != total:
        raise ValueError(f"results for {len(seen)} of {total} sequences; missing {sorted(set(range(total)) - seen)[:10]}")
    return out


def hf_packed_position_ids(micro_batch: PackedMicroBatch) -> torch.Tensor:
    """LongTensor[4, 1, T] for a transformers Qwen-VL forward over a packed micro-batch (batch size 1).

    Row 0 holds text positions restarting at 0 per sequence (and for the padding block); transformers
    reads it to build a block-diagonal causal mask (``find_packed_sequence_indices``) when no
    ``attention_mask`` is given. Rows 1-3 are the micro-batch's M-RoPE positions.
    """
    lengths = micro_batch.sequence_lengths().tolist() + ([micro_batch.num_pad] if micro_batch.num_pad else [])
    text = torch.cat([torch.arange(n) for n in lengths]) if lengths else torch.zeros(0, dtype=torch.long)
    return torch.cat([text.unsqueeze(0), micro_batch.position_ids.long().cpu()], dim=0).unsqueeze(1).to(
        micro_batch.position_ids.device)
