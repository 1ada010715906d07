"""One rollout engine shared by the trainer ranks of a rollout-TP group.

With ``rollout.tensor_parallel_size = k``, the k consecutive local ranks of a node share one SGLang
engine started by the group's first rank (``sglang_engine.rollout_placement``). Every rank still runs
the same trainer loop with its own prompts, so this wrapper gathers the group's requests on the
owner, decodes them in one batch, and scatters each rank's completions back. Identical request
lists (the ranks of one model replica: TP / CP / PP peers share a data-parallel rank, so their
prompts and seeds agree) are decoded once and every such rank gets the same completions. Weights reach the
engine collectively (each rank serialises its own GPU's copy; ``update_weights_colocated_group``).
With k = 1 it is a transparent pass-through.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from care_megatron.rollout.base import Completion, GenerationRequest, SamplingParams


def _request_key(requests: list[GenerationRequest], sampling: SamplingParams) -> tuple:
    """Identity of one rank's request list: ids, prompt tokens, image sizes and the sampling seed."""
    def one(r):
        pixels = getattr(r, "pixel_values", None)
        return (r.request_id, tuple(int(t) for t in r.prompt_ids),
                None if pixels is None else tuple(pixels.shape), len(getattr(r, "images", None) or []))

    return (sampling.seed, tuple(one(r) for r in requests))


class GroupedRolloutEngine:
    """``RolloutEngine`` over a process group of ``group_size`` ranks; ``engine`` lives on the owner only.

    Args:
        engine: the real engine on the owner rank, None on the others.
        group: ``torch.distributed`` process group of the ranks sharing the engine (None: world).
        owner_rank: global rank of the owner.
        stop_token_ids: the engine's stop tokens, known on every rank (the trainer reads them).
        tp_rank / group_size: this rank's index in the group and the group's size.
        sglang_api: the SGLang API surface, for the collective weight update (None: pass-through).
    """

    def __init__(self, engine: Any, *, group: Any, owner_rank: int, stop_token_ids: Iterable[int],
                 tp_rank: int, group_size: int, sglang_api: Any = None):
        if (tp_rank == 0) != (engine is not None):
            raise ValueError("GroupedRolloutEngine: exactly the owner (tp_rank 0) holds the engine")
        self.engine, self.group, self.owner_rank = engine, group, owner_rank
        self.stop_token_ids = sorted(int(t) for t in stop_token_ids)
        self.tp_rank, self.group_size, self.api = tp_rank, group_size, sglang_api

    @property
    def is_owner(self) -> bool:
        return self.engine is not None

    def generate(self, requests: list[GenerationRequest], sampling: SamplingParams) -> list[Completion]:
        import torch.distributed as dist

        gathered = [None] * self.group_size if self.is_owner else None
        dist.gather_object((_request_key(requests, sampling), list(requests)), gathered, dst=self.owner_rank,
                           group=self.group)
        chunks = None
        if self.is_owner:
            # Ranks of one model replica (TP / CP / PP peers: same data-parallel rank) send the same
            # requests with the same seed: decode those once and give every peer the same completions
            # (sampled separately they would differ, and the peers must train on identical sequences).
            distinct: dict = {}
            for key, part in gathered:
                distinct.setdefault(key, part)
            flat = [r for part in distinct.values() for r in part]
            completions = self.engine.generate(flat, sampling)
            by_key, start = {}, 0
            for key, part in distinct.items():
                by_key[key] = completions[start:start + len(part)]
                start += len(part)
            chunks = [by_key[key] for key, _ in gathered]
        mine = [None]
        dist.scatter_object_list(mine, chunks, src=self.owner_rank, group=self.group)
        return mine[0]

    def update_weights_from_buckets(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> None:
        if self.api is None:  # a non-SGLang engine: the owner loads, the others only iterate (collective export)
            if self.is_owner:
                self.engine.update_weights(pair for bucket in buckets for pair in bucket)
            else:
                for _ in buckets:
                    pass
            self._barrier()
            return
        from care_megatron.rollout.sglang_engine import update_weights_colocated_group

        update_weights_colocated_group(self.engine, buckets, api=self.api, tp_rank=self.tp_rank,
                                       tp_size=self.group_size, owner_rank=self.owner_rank, group=self.group)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.update_weights_from_buckets([list(named_tensors)])

    def _barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.group)

    def sleep(self, tags=None) -> None:
        """The owner releases ``tags`` (``base.MEMORY_TAGS``; None: all); every rank waits for it."""
        if self.is_owner:
            self.engine.sleep(tags)
        self._barrier()

    def wake(self, tags=None) -> None:
        """The owner resumes ``tags``; every rank waits, so none starts streaming weights early."""
        if self.is_owner:
            self.engine.wake(tags)
        self._barrier()

    def shutdown(self) -> None:
        if self.is_owner:
            self.engine.shutdown()


def rollout_groups(world_size: int, local_world_size: int, rollout_tp: int) -> list[list[int]]:
    """Global ranks of every rollout-TP group, node by node (nodes hold ``local_world_size`` ranks each)."""
    if world_size % local_world_size or local_world_size % rollout_tp:
        raise ValueError(f"world {world_size} / local {local_world_size} / rollout TP {rollout_tp} do not tile")
    return [list(range(start, start + rollout_tp)) for start in range(0, world_size, rollout_tp)]
