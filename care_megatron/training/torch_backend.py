"""Plain-PyTorch training backend: one process, a transformers Qwen-VL model, THD-packed batches.

This is the embedded default's trainer and the reference the Megatron backend is tested against.
Packed micro-batches are unpacked into a right-padded batch for the Hugging Face model (see
``_language_forward``); results come back in the packed layout, so this backend and the Megatron
backend exchange exactly the same tensors with the trainer.
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Iterator

import torch

from care_megatron.algorithm.policy_losses import combine_loss_metrics
from care_megatron.data.batch import PackedMicroBatch
from care_megatron.models.weight_mapping.architectures import mapping_for_config
from care_megatron.rollout.base import bucket_named_tensors
from care_megatron.training.base import ForwardOutputs, LossFn, StepResult
from care_megatron.training.packed_utils import align_next_token, pool_think_hidden

log = logging.getLogger(__name__)

GROUP_OVERHEAD_TOKENS = 256
"""What one more model call costs, in padded tokens (``length_groups``' trade-off: a group saves the
padding of its rows, but each call re-runs per-call work such as the layer loop's launch costs)."""


def length_groups(lengths: list[int], overhead: int = GROUP_OVERHEAD_TOKENS) -> list[list[int]]:
    """Partition sequences (by index) into groups run as separate padded batches, minimising
    ``sum over groups (rows x longest) + overhead x groups``: an exact dynamic programme over the
    sequences sorted by length (an optimal partition is contiguous in that order). Each group lists
    its indices ascending; groups come shortest first."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    best = [0] + [None] * len(order)
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        longest = lengths[order[end - 1]]
        for start in range(end):
            cost = best[start] + (end - start) * longest + overhead
            if best[end] is None or cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], len(order)
    while end > 0:
        groups.append(sorted(order[cut[end]:end]))
        end = cut[end]
    return groups[::-1]


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float,
                   with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(labels | hidden) under softmax(hidden @ weight.T / temperature), chunk-wise (see kernels.logprobs)."""
    from care_megatron.kernels.logprobs import linear_logprobs

    return linear_logprobs(hidden, weight, labels, temperature=temperature, with_entropy=with_entropy)


class TorchBackend:
    """``TrainingBackend`` on a single device with a transformers ``*ForConditionalGeneration`` model.

    Args:
        model: the policy (transformers Qwen2.5-VL / Qwen3-VL model).
        lr, weight_decay, warmup_steps, grad_clip: AdamW and schedule (linear warm-up, then constant).
        temperature: the rollout sampling temperature; log-probs are of softmax(logits / temperature)
            so the importance ratio compares like with like (the rollout engine reports the same).
        reference: keep a frozen copy of the initial policy for the KL term (None = no reference).
        group_by_length: run each micro-batch's sequences in groups of similar length (less padding;
            the same results up to floating-point summation order).
    """

    def __init__(self, model: torch.nn.Module, *, lr: float, weight_decay: float = 0.0, warmup_steps: int = 0,
                 grad_clip: float = 1.0, temperature: float = 1.0, keep_reference: bool = True,
                 device: str | torch.device = "cpu", group_by_length: bool = False) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.reference = None
        if keep_reference:
            self.reference = copy.deepcopy(model).eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)
        self.temperature = float(temperature)
        self.group_by_length = bool(group_by_length)
        self.grad_clip = grad_clip
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8)
        warm = max(int(warmup_steps), 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warm) if warm else 1.0)
        self.steps_taken = 0

    def owned_parameters(self) -> tuple[list[torch.Tensor], None]:
        """The parameters the optimizer updates (all on this process) for ``update/param_norm``."""
        return [p for p in self.model.parameters() if p.requires_grad], None

    # ------------------------------------------------------------------ forward
    def _language_forward(self, model: torch.nn.Module, mb: PackedMicroBatch) -> torch.Tensor:
        """Final-layer (post-norm) hidden states [T, D] of one packed micro-batch.

        The THD micro-batch is laid out as right-padded [n, L_max] batches for the HF model (an
        attention mask keeps sequences apart, each sequence keeps its own M-RoPE positions), then
        the hidden states are gathered back to the packed token order. On CPU this costs
        n * L_max^2 attention work instead of the T^2 of a dense block-diagonal mask over the pack.
        With ``group_by_length`` the sequences go through the model in groups of similar length
        (:func:`length_groups`), each with its own images, so a few long sequences (RGR's reflection
        prompts are twice as long) do not pad every other row to their length.
        """
        mb = mb.to(self.device)
        lengths = mb.sequence_lengths()
        groups = (length_groups(lengths.tolist(), GROUP_OVERHEAD_TOKENS) if self.group_by_length
                  else [list(range(mb.num_sequences))])
        if len(groups) == 1:
            hidden = self._padded_forward(model, mb, lengths, torch.arange(mb.num_sequences, device=self.device))[1]
        else:
            images = self._image_owners(model, mb) if mb.pixel_values is not None else None
            sources, outputs = zip(*(self._padded_forward(model, mb, lengths, torch.tensor(g, device=self.device), images)
                                     for g in groups))
            order = torch.cat(sources)
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel(), device=self.device)
            hidden = torch.cat(outputs)[inverse]
        if mb.num_pad:
            hidden = torch.cat([hidden, hidden.new_zeros(mb.num_pad, hidden.shape[-1])])
        return hidden

    def _padded_forward(self, model: torch.nn.Module, mb: PackedMicroBatch, lengths: torch.Tensor,
                        sequences: torch.Tensor, images=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder on ``sequences`` (ascending indices into ``mb``) as one right-padded batch with
        their images (``images``: :meth:`_image_owners` of ``mb``, needed when ``sequences`` is not all
        of it); returns (packed token index of each output row, hidden states [tokens, D])."""
        group_lengths = lengths[sequences]
        n, width = sequences.numel(), int(group_lengths.max())
        starts = mb.cu_seqlens[:-1].long().to(self.device)[sequences]
        rows = torch.repeat_interleave(torch.arange(n, device=self.device), group_lengths)
        first = torch.cumsum(group_lengths, 0) - group_lengths
        cols = torch.arange(int(group_lengths.sum()), device=self.device) - first[rows]
        source = starts[rows] + cols
        input_ids = torch.full((n, width), 0, dtype=torch.long, device=self.device)
        input_ids[rows, cols] = mb.input_ids[source]
        attention_mask = torch.zeros((n, width), dtype=torch.long, device=self.device)
        attention_mask[rows, cols] = 1
        position_ids = torch.zeros((3, n, width), dtype=torch.long, device=self.device)
        position_ids[:, rows, cols] = mb.position_ids[:, source].long()
        pixel_values, image_grid_thw = mb.pixel_values, mb.image_grid_thw
        if pixel_values is not None and n < mb.num_sequences:
            pixel_values, image_grid_thw = self._group_images(mb, sequences, *images)
        out = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          pixel_values=pixel_values, image_grid_thw=image_grid_thw, use_cache=False)
        return source, out.last_hidden_state[rows, cols]

    def _image_owners(self, model: torch.nn.Module, mb: PackedMicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-batch's images (packing order): the sequence each belongs to, and its pixel-row count."""
        grid = mb.image_grid_thw.to(self.device)
        patches = grid.prod(-1)
        merge = int(model.config.vision_config.spatial_merge_size)
        tokens = patches // (merge * merge)
        T = int(mb.cu_seqlens[-1])
        positions = torch.nonzero(mb.input_ids[:T] == model.config.image_token_id).flatten()
        first_token = positions[torch.cumsum(tokens, 0) - tokens]
        owner = torch.searchsorted(mb.cu_seqlens[1:].long().to(self.device), first_token, right=True)
        return owner, patches

    def _group_images(self, mb: PackedMicroBatch, sequences: torch.Tensor, owner: torch.Tensor, patches: torch.Tensor):
        """Pixel rows and grids of the images that belong to ``sequences`` (in packing order), or (None, None)."""
        keep = torch.isin(owner, sequences)
        if not bool(keep.any()):
            return None, None
        offsets = torch.cumsum(patches, 0) - patches
        rows = torch.cat([torch.arange(int(o), int(o + p), device=self.device)
                          for o, p in zip(offsets[keep].tolist(), patches[keep].tolist())])
        return mb.pixel_values[rows], mb.image_grid_thw.to(self.device)[keep]

    def _outputs(self, model: torch.nn.Module, mb: PackedMicroBatch, with_entropy: bool,
                 with_think_embeddings: bool) -> ForwardOutputs:
        hidden = self._language_forward(model, mb)
        weight = model.get_output_embeddings().weight
        labels = mb.input_ids.to(self.device)[1:]
        lp, ent = token_logprobs(hidden[:-1], weight, labels, self.temperature, with_entropy)
        logprobs = align_next_token(lp, mb)
        entropy = align_next_token(ent, mb) if ent is not None else None
        emb = pool_think_hidden(hidden.detach().float(), mb) if with_think_embeddings else None
        return ForwardOutputs(logprobs=logprobs, entropy=entropy, think_embeddings=emb)

    @torch.no_grad()
    def forward_logprobs(self, micro_batches: list[PackedMicroBatch], *, model: str = "policy",
                         with_entropy: bool = False, with_think_embeddings: bool = False) -> list[ForwardOutputs]:
        if model == "policy":
            net = self.model
        elif model == "reference":
            if self.reference is None:
                raise ValueError("this backend keeps no reference model (keep_reference=False)")
            net = self.reference
        else:
            raise ValueError(f"model must be 'policy' or 'reference', got {model!r}")
        was_training = net.training
        net.eval()
        try:
            return [self._outputs(net, mb, with_entropy, with_think_embeddings) for mb in micro_batches]
        finally:
            net.train(was_training)

    # ------------------------------------------------------------------ update
    def train_step(self, micro_batches: list[PackedMicroBatch], loss_fn: LossFn, normalisers: dict) -> StepResult:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = 0.0
        metrics: dict[str, float] = {}
        finite = True
        for mb in micro_batches:
            outputs = self._outputs(self.model, mb, with_entropy=True, with_think_embeddings=False)
            loss, m = loss_fn(outputs, mb.to(self.device), normalisers)
            if not torch.isfinite(loss):
                finite = False
                break
            loss.backward()
            total_loss += float(loss.detach())
            combine_loss_metrics(metrics, {**m, "micro_batches": 1.0})
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip)) if params and finite else float("nan")
        lr = self.optimizer.param_groups[0]["lr"]
        if not finite or not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            log.warning("non-finite loss or gradient (loss=%s, grad_norm=%s): step skipped", total_loss, grad_norm)
            return StepResult(loss=total_loss if finite else float("nan"), grad_norm=grad_norm, learning_rate=lr,
                              skipped=True, metrics=metrics)
        self.optimizer.step()
        self.scheduler.step()
        self.steps_taken += 1
        return StepResult(loss=total_loss, grad_norm=grad_norm, learning_rate=lr, metrics=metrics)

    # ------------------------------------------------------------------ weights / state
    def export_weights(self, bucket_bytes: int = 512 << 20) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """The policy's tensors under their on-disk Hugging Face names (what ``save_pretrained``
        writes and SGLang's loaders map: ``model.layers.*`` / ``visual.*`` for Qwen2.5-VL, not the
        in-memory ``model.language_model.*``), bucketed: the same contract as the Megatron export.

        Always from the training device: while asleep (weights in host memory) each tensor is copied
        back as its bucket is built and dropped with it, so only the weights wake, one bucket at a
        time (as the Megatron backend restores only its parameters). Host tensors would reach SGLang
        through shared-memory file descriptors instead of CUDA IPC, and a rollout-TP rank other than
        the owner could not open them (they need the sending process's authkey)."""
        try:
            spec = mapping_for_config(self.model.config)
        except ValueError:  # an architecture the mapping does not know keeps its module names
            spec = None

        def on_disk(name: str) -> str:
            return (spec.canonical_hf_name(name) if spec is not None else None) or name

        named = ((on_disk(name), t.detach().to(self.device)) for name, t in self.model.state_dict().items())
        return bucket_named_tensors(named, bucket_bytes)

    def state_dict_for_checkpoint(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "reference": self.reference.state_dict() if self.reference is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "steps_taken": self.steps_taken,
        }

    def load_state_dict_from_checkpoint(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.reference is not None and state.get("reference") is not None:
            self.reference.load_state_dict(state["reference"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps_taken = int(state["steps_taken"])

    def save_checkpoint(self, path: str) -> None:
        torch.save(self.state_dict_for_checkpoint(), path)

    def load_checkpoint(self, path: str) -> None:
        self.load_state_dict_from_checkpoint(torch.load(path, map_location=self.device, weights_only=False))

    def sleep(self) -> None:
        """Policy (weights, gradients), optimizer state and the reference model to host memory."""
        if self.device.type == "cuda":
            self._move_state(torch.device("cpu"))
            torch.cuda.empty_cache()

    def wake(self) -> None:
        if self.device.type == "cuda":
            self._move_state(self.device)

    def _move_state(self, device: torch.device) -> None:
        for net in (self.model, self.reference):
            if net is not None:
                net.to(device)
        for state in self.optimizer.state.values():
            for k, v in state.items():
                if torch.is_tensor(v):
                    state[k] = v.to(device)
