"""The RL step's phase order on GPU when rollouts and training share the devices, timed per phase.

Order (issue 7): wake rollout weights -> update weights -> wake rollout KV cache -> generate (+ RGR
resamples) -> sleep rollout -> wake trainer -> log-prob passes -> train -> sleep trainer. Weights go
to the engine right after its weights wake (a slept SGLang engine has discarded them), its KV cache
is allocated only once the weight buckets are through, and the engine sleeps before the trainer wakes, so
the two never hold their memory at once. ``StepSchedule`` enforces that order (a phase out of order
raises) and ``PhaseTimer`` times each phase; the trainer logs ``StepSchedule.metrics()``.
"""
from __future__ import annotations

import contextlib
import inspect
import time
from typing import Any, Callable, Iterator

PHASES: tuple[str, ...] = (
    "wake_rollout",
    "update_weights",
    "wake_rollout_kv",
    "generate",
    "sleep_rollout",
    "wake_trainer",
    "logprobs",
    "train",
    "sleep_trainer",
)
"""The phases of one colocated RL step, in order."""

REPEATABLE = frozenset({"generate", "logprobs"})
"""Phases that may be entered several times in a row (RGR resamples; policy then reference passes)."""


def cuda_synchronize() -> None:
    """Wait for queued GPU work so a phase's time is its own (no-op without CUDA)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class PhaseTimer:
    """Wall-clock seconds per named phase, summed over repeats.

    Args:
        sync: called before a phase starts and after it ends (default: ``cuda_synchronize``), so
            asynchronous GPU work is charged to the phase that queued it.
        clock: seconds as float (``time.perf_counter``; tests inject a fake clock).
    """

    def __init__(self, sync: Callable[[], None] | None = cuda_synchronize, clock: Callable[[], float] = time.perf_counter):
        self.sync = sync or (lambda: None)
        self.clock = clock
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.sync()
        start = self.clock()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + self.clock() - start
            self.counts[name] = self.counts.get(name, 0) + 1

    def metrics(self, prefix: str = "timing/") -> dict[str, float]:
        """``{prefix + phase: seconds}`` plus ``{prefix}step`` (their sum)."""
        out = {f"{prefix}{name}": secs for name, secs in self.seconds.items()}
        out[f"{prefix}step"] = sum(self.seconds.values())
        return out

    def reset(self) -> None:
        self.seconds.clear()
        self.counts.clear()


class StepSchedule:
    """Enforces ``PHASES`` order within one step and times each phase.

    Use::

        schedule.begin_step()
        with schedule.phase("wake_rollout"): engine.wake(tags=("weights",))
        with schedule.phase("update_weights"): sync_weights(backend, engine, bucket_bytes)
        with schedule.phase("wake_rollout_kv"): engine.wake(tags=("kv_cache",))
        ...
        metrics = schedule.end_step()

    A phase may be skipped (e.g. no ``sleep_*`` on a CPU run, no ``update_weights`` before the first
    step when the engine started from the same weights), never reordered; ``end_step`` returns the
    timings and the phases entered, in order.
    """

    def __init__(self, timer: PhaseTimer | None = None, phases: tuple[str, ...] = PHASES):
        self.timer = timer or PhaseTimer()
        self.phases = phases
        self.entered: list[str] = []
        self._position = -1
        self._in_step = False

    def begin_step(self) -> None:
        if self._in_step:
            raise RuntimeError("StepSchedule.begin_step: the previous step was not ended")
        self.timer.reset()
        self.entered = []
        self._position = -1
        self._in_step = True

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self._in_step:
            raise RuntimeError(f"StepSchedule.phase({name!r}) outside begin_step() / end_step()")
        if name not in self.phases:
            raise ValueError(f"unknown phase {name!r}; phases: {', '.join(self.phases)}")
        index = self.phases.index(name)
        repeat = index == self._position and name in REPEATABLE
        if index <= self._position and not repeat:
            raise RuntimeError(
                f"phase {name!r} out of order: already past {self.phases[self._position]!r} "
                f"(order: {' -> '.join(self.phases)})"
            )
        self._position = index
        self.entered.append(name)
        with self.timer.phase(name):
            yield

    def end_step(self) -> dict[str, float]:
        """Timings of the step (``timing/<phase>`` seconds and ``timing/step``)."""
        if not self._in_step:
            raise RuntimeError("StepSchedule.end_step without begin_step")
        self._in_step = False
        return self.timer.metrics()


def sync_weights(backend: Any, engine: Any, bucket_bytes: int) -> int:
    """Stream the trainer's weights into the rollout engine; returns the bytes sent.

    Uses ``engine.update_weights_from_buckets`` when the engine has it (SGLang: one call per
    exporter bucket, no re-bucketing), else ``engine.update_weights`` over the flattened stream.

    Asks the backend for views of its weights where it offers them (``export_weights(..., views=True)``):
    both engine paths copy every tensor (the HF engine into its parameters, SGLang into a flattened
    bucket) and finish with a bucket before the next one is exported, so a copy made by the exporter
    would only be copied again.
    """
    sent = 0

    def counted(buckets):
        nonlocal sent
        for bucket in buckets:
            sent += sum(t.numel() * t.element_size() for _, t in bucket)
            yield bucket

    export = backend.export_weights
    buckets = counted(export(bucket_bytes, views=True) if _accepts_keyword(export, "views") else export(bucket_bytes))
    if hasattr(engine, "update_weights_from_buckets"):
        engine.update_weights_from_buckets(buckets)
    else:
        engine.update_weights(pair for bucket in buckets for pair in bucket)
    return sent


def _accepts_keyword(function: Any, name: str) -> bool:
    """Whether ``function`` takes keyword ``name`` (backends that predate an option keep their own policy)."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
