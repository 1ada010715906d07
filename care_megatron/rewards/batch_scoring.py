"""Scoring many responses at once, in a process pool when it pays off (scoring is CPU-bound Python).

Sits above both the verifier and the reward registry: the functions it runs are looked up by name in
the registry (:func:`care_megatron.rewards.registry.get_reward_fn`), so worker processes can import
them by name.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional, Sequence

from care_megatron.rewards.registry import get_reward_fn
from care_megatron.rewards.verifier import Choices, RewardScore, VerifierConfig

SEQUENTIAL_BELOW = 256
"""Batches smaller than this are scored in-process: a process pool costs more to start than it saves."""


def _broadcast(value, n: int, name: str) -> list:
    if value is None:
        return [None] * n
    if isinstance(value, (str, Mapping)):
        raise ValueError(f"{name} must be a list with one entry per response, got {type(value).__name__}")
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries for {n} responses")
    return value


def _score_chunk(args) -> list[RewardScore]:
    reward_fn_name, items, config = args
    fn = get_reward_fn(reward_fn_name)
    return [fn(r, g, answer_type=t, choices=c, config=config) for r, g, t, c in items]


def score_batch(
    responses: Sequence[str],
    ground_truths: Sequence[Any],
    answer_types: Optional[Sequence[Optional[str]]] = None,
    choices: Optional[Sequence[Choices]] = None,
    num_workers: Optional[int] = None,
    progress: bool = False,
    *,
    reward_fn: str = "verifier",
    config: Optional[VerifierConfig] = None,
    chunk_size: Optional[int] = None,
) -> list[RewardScore]:
    """Score many responses, in a process pool when it pays off (scoring is CPU-bound Python).

    Args:
        responses, ground_truths: ``[N]`` each.
        answer_types, choices: ``[N]`` each or None.
        num_workers: pool size; None = all CPUs of this process (``os.sched_getaffinity``); <= 1 or
            ``N < SEQUENTIAL_BELOW`` runs sequentially in this process.
        progress: show a tqdm progress bar.
        reward_fn: registry name or dotted path of the reward function (see
            :func:`care_megatron.rewards.registry.get_reward_fn`); must be importable by name in the
            worker processes.
        config: verifier configuration passed to every call.
        chunk_size: responses per task sent to a worker (default: about 8 tasks per worker).

    Returns:
        ``[N]`` :class:`RewardScore`, in input order.
    """
    n = len(responses)
    truths = _broadcast(ground_truths, n, "ground_truths")
    types = _broadcast(answer_types, n, "answer_types")
    opts = _broadcast(choices, n, "choices")
    get_reward_fn(reward_fn)  # fail fast on a bad name, before starting processes
    items = list(zip(responses, truths, types, opts))
    if num_workers is None:
        num_workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="scoring", unit="resp")
    try:
        if num_workers <= 1 or n < SEQUENTIAL_BELOW:
            out = []
            fn = get_reward_fn(reward_fn)
            for r, g, t, c in items:
                out.append(fn(r, g, answer_type=t, choices=c, config=config))
                if bar is not None:
                    bar.update(1)
            return out
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        size = chunk_size or max(1, math.ceil(n / (num_workers * 8)))
        chunks = [items[i : i + size] for i in range(0, n, size)]
        results: list[Optional[list[RewardScore]]] = [None] * len(chunks)
        # spawn: the parent typically holds torch / CUDA / thread pools that must not be forked.
        with ProcessPoolExecutor(max_workers=num_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_score_chunk, (reward_fn, chunk, config)): i for i, chunk in enumerate(chunks)}
            for future in as_completed(futures):
                i = futures[future]
                results[i] = future.result()
                if bar is not None:
                    bar.update(len(chunks[i]))
        return [s for chunk in results for s in chunk]
    finally:
        if bar is not None:
            bar.close()
