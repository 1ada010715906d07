"""The update schedule of one RL step: several optimizer updates per rollout batch (docs/algorithm.md section 6).

Advantages, behaviour (old) log-probs and reference log-probs are computed once per step, with the
rollout-time weights. The step's sequences are then split into mini-batches of whole prompt groups,
in order (a group's RGR samples and DAPO refills travel with it), and each mini-batch is one
``backend.train_step``: forward and backward over its micro-batches, gradient clip, optimizer and
learning-rate-scheduler step. From the second update on the policy has moved away from the behaviour
policy, so the importance ratio differs from 1 and the PPO / dual / GSPO clips act. ``ppo_epochs``
repeats the pass over the same mini-batches in the same order (verl's ``ppo_epochs``; EasyR1 and
verl do not reshuffle by default).

Loss normalisers are per mini-batch and global over data-parallel ranks (the trainer reduces them),
so an update's loss does not depend on micro-batching, packing or data parallelism.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist

from care_megatron.algorithm.policy_losses import combine_loss_metrics
from care_megatron.data.batch import PackedMicroBatch, Sequence
from care_megatron.training.base import LossFn, StepResult
from care_megatron.training.megatron.parallel_state import all_reduce_host_values


def minibatch_sequences(group_of_sequence: list[int], num_minibatches: int) -> list[list[int]]:
    """Sequence indices of each mini-batch (one optimizer update).

    The prompt groups, in order of first appearance, are cut into ``num_minibatches`` contiguous runs
    of whole groups, as even as possible (the earlier runs take one group more when the count does not
    divide); each run lists its sequences in their original order. Every run holds at least one group
    when ``num_minibatches`` <= the number of groups (the trainer guarantees it).
    """
    if num_minibatches < 1:
        raise ValueError(f"num_minibatches must be >= 1, got {num_minibatches}")
    groups = list(dict.fromkeys(group_of_sequence))
    if num_minibatches > len(groups):
        raise ValueError(f"{num_minibatches} mini-batches need at least as many prompt groups, got {len(groups)}")
    base, extra = divmod(len(groups), num_minibatches)
    run_of_group, start = {}, 0
    for run in range(num_minibatches):
        size = base + (1 if run < extra else 0)
        for group in groups[start:start + size]:
            run_of_group[group] = run
        start += size
    runs: list[list[int]] = [[] for _ in range(num_minibatches)]
    for index, group in enumerate(group_of_sequence):
        runs[run_of_group[group]].append(index)
    return runs


def minibatch_count(num_groups: int, configured: int, dp_group=None) -> int:
    """Mini-batches (updates per epoch) of one step: ``configured`` (``data.prompts_per_step /
    train.prompts_per_update``), fewer only when some data-parallel rank holds fewer prompt groups
    than that (DAPO keeps fewer groups when its refills run dry), since every rank must take the same
    number of updates: each is a collective over the data-parallel group."""
    fewest = int(all_reduce_host_values([num_groups], dp_group, op=dist.ReduceOp.MIN)[0])
    return max(1, min(configured, fewest))


def pack_minibatch(sequences: list[Sequence], indices: list[int],
                   pack: Callable[[list[Sequence]], list[PackedMicroBatch]]) -> list[PackedMicroBatch]:
    """Pack ``sequences[indices]`` on their own (no micro-batch straddles two updates) and give each
    micro-batch's ``sequence_indices`` in the step's numbering, so per-sequence inputs (advantages,
    correctness) index the same way for every mini-batch."""
    packed = pack([sequences[i] for i in indices])
    lookup = torch.tensor(indices, dtype=torch.long)
    for mb in packed:
        mb.sequence_indices = lookup[mb.sequence_indices]
    return packed


def run_updates(backend, minibatches: list[list[PackedMicroBatch]], normalisers: list[dict], loss_fn: LossFn,
                ppo_epochs: int = 1) -> StepResult:
    """``ppo_epochs`` passes over ``minibatches``, one ``backend.train_step`` (optimizer update) each;
    the results merged by :func:`merge_update_results`."""
    results = [backend.train_step(micro_batches, loss_fn, norm)
               for _ in range(ppo_epochs) for micro_batches, norm in zip(minibatches, normalisers)]
    return merge_update_results(results)


def merge_update_results(results: list[StepResult]) -> StepResult:
    """One step's report from its updates' ``StepResult`` s.

    ``loss`` and ``grad_norm``: means over the updates that were applied (NaN when none was);
    ``learning_rate``: the last update's; ``skipped``: True when any update was skipped (non-finite
    loss or gradient), so the trainer's bad-step guard still sees it. Loss metrics: ``count/*`` and
    ``micro_batches`` summed (clip fractions and ratio means are rebuilt from the summed counts),
    ``min/*`` / ``max/*`` by minimum / maximum, every other (globally normalised) value averaged over
    the updates. Adds ``ppo/updates`` and ``ppo/skipped_updates``.
    """
    if not results:
        raise ValueError("merge_update_results needs at least one update")
    applied = [r for r in results if not r.skipped]
    combined: dict[str, float] = {}
    for r in results:
        combine_loss_metrics(combined, r.metrics)
    for key in combined:
        if not key.startswith(("count/", "min/", "max/")) and key != "micro_batches":
            combined[key] /= len(results)
    combined["ppo/updates"] = float(len(results))
    combined["ppo/skipped_updates"] = float(len(results) - len(applied))

    def mean(values):
        return sum(values) / len(values) if values else math.nan

    return StepResult(loss=mean([r.loss for r in applied]), grad_norm=mean([r.grad_norm for r in applied]),
                      learning_rate=results[-1].learning_rate, skipped=len(applied) < len(results), metrics=combined)
