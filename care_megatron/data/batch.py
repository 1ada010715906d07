"""The two containers that carry token data from the rollout to the training backends.

Conventions, relied on by every backend and loss:

* A :class:`Sequence` is one prompt followed by one response, as a flat list of token ids.
* Per-token tensors are *aligned with ``input_ids``*: the value at position ``t`` belongs to token
  ``input_ids[t]``. A log-prob at ``t`` is ``log p(input_ids[t] | input_ids[:t])`` inside the same
  sequence; the first token of every sequence has no predictor and gets 0.
* ``loss_mask[t]`` is True for response tokens (the tokens the policy generated); prompt and padding
  tokens are False.
* ``region_ids`` uses :class:`care_megatron.rewards.regions.Region` codes.
* ``token_fields`` holds any further per-token float/int tensors the loss needs (behaviour /
  old log-probs, reference log-probs, per-token advantages, token weights); packing concatenates
  them like ``input_ids`` and pads them with zeros.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from care_megatron.rewards.regions import Region


@dataclass
class Sequence:
    """One prompt + response, unpacked.

    Shapes: ``input_ids`` LongTensor[L]; ``loss_mask`` BoolTensor[L]; ``region_ids``
    LongTensor[L]; ``position_ids`` LongTensor[3, L] (M-RoPE t/h/w) or None to have packing compute
    them; ``pixel_values`` FloatTensor[P, C] (the Qwen-VL processor's flattened patches for this
    sequence's images, in order) or None; ``image_grid_thw`` LongTensor[n_images, 3] or None.
    """

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    region_ids: torch.Tensor
    position_ids: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    token_fields: dict[str, torch.Tensor] = field(default_factory=dict)
    sequence_id: int = -1

    def __len__(self) -> int:
        return int(self.input_ids.numel())


@dataclass
class PackedMicroBatch:
    """Several sequences concatenated along one token axis (THD layout, batch size 1).

    Shapes (T = packed length including padding, n = number of sequences):
    ``input_ids`` LongTensor[T]; ``position_ids`` LongTensor[3, T] restarting per sequence;
    ``cu_seqlens`` Int32Tensor[n + 1] (cumulative *unpadded* boundaries; ``cu_seqlens[-1]`` may be
    smaller than T when ``num_pad`` > 0, the padding sits after the last sequence);
    ``loss_mask`` BoolTensor[T]; ``region_ids`` LongTensor[T]; ``sequence_indices`` LongTensor[n]
    (index of each packed sequence in the list given to ``pack_sequences``); ``pixel_values``
    FloatTensor[P, C] or None and ``image_grid_thw`` LongTensor[n_images, 3] or None, the images of
    the packed sequences in packing order; ``token_fields`` per-token extras, each [T].
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    loss_mask: torch.Tensor
    region_ids: torch.Tensor
    sequence_indices: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    token_fields: dict[str, torch.Tensor] = field(default_factory=dict)
    num_pad: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_sequences(self) -> int:
        return int(self.sequence_indices.numel())

    def sequence_lengths(self) -> torch.Tensor:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    def token_sequence_ids(self) -> torch.Tensor:
        """LongTensor[T]: position in this micro-batch (0..n-1) of each token's sequence; -1 on padding."""
        lengths = self.sequence_lengths()
        ids = torch.repeat_interleave(torch.arange(self.num_sequences, device=lengths.device), lengths)
        if self.num_pad:
            ids = torch.cat([ids, ids.new_full((self.num_pad,), -1)])
        return ids

    def padded_to(self, total: int, pad_token_id: int = 0) -> "PackedMicroBatch":
        """This micro-batch with its padding tail extended to ``total`` tokens (the tail stays one
        segment: positions 0.., ``pad_token_id``, loss mask False, zero token fields). Used where every
        micro-batch of a step must have the same length (Megatron's interleaved pipeline schedule)."""
        extra = total - self.num_tokens
        if extra < 0:
            raise ValueError(f"cannot pad a micro-batch of {self.num_tokens} tokens to {total}")
        if extra == 0:
            return self

        def grow(t, fill):
            return torch.cat([t, t.new_full((extra,), fill)])

        tail = self.num_pad + extra
        real = self.num_tokens - self.num_pad
        positions = torch.cat([self.position_ids[:, :real],
                               torch.arange(tail, device=self.position_ids.device,
                                            dtype=self.position_ids.dtype).unsqueeze(0).expand(3, -1)], dim=1)
        return PackedMicroBatch(
            input_ids=grow(self.input_ids, pad_token_id), position_ids=positions, cu_seqlens=self.cu_seqlens,
            loss_mask=grow(self.loss_mask, False), region_ids=grow(self.region_ids, int(Region.OTHER)),
            sequence_indices=self.sequence_indices, pixel_values=self.pixel_values, image_grid_thw=self.image_grid_thw,
            token_fields={k: grow(v, 0) for k, v in self.token_fields.items()}, num_pad=tail)

    def to(self, device: torch.device | str) -> "PackedMicroBatch":
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        return PackedMicroBatch(
            input_ids=move(self.input_ids),
            position_ids=move(self.position_ids),
            cu_seqlens=move(self.cu_seqlens),
            loss_mask=move(self.loss_mask),
            region_ids=move(self.region_ids),
            sequence_indices=self.sequence_indices,
            pixel_values=move(self.pixel_values),
            image_grid_thw=move(self.image_grid_thw),
            token_fields={k: move(v) for k, v in self.token_fields.items()},
            num_pad=self.num_pad,
        )
