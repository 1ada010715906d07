"""Process-level helpers shared by the RL loop, SFT and evaluation."""
from __future__ import annotations

import logging
import random
import signal

import numpy as np
import torch

from care_megatron.config.schema import RunConfig
from care_megatron.models.policy import policy_model_config  # noqa: F401  (moved; trainer / SFT import it from here)


def seed_everything(seed: int, threads: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)


def is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# ---------------------------------------------------------------- preemption (Slurm --signal / SIGTERM)

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
"""What a scheduler sends before it stops a job: Slurm's ``--signal=USR1@<seconds>`` warning (which
the sbatch scripts forward to every trainer through torchrun), and SIGTERM at preemption or time-out."""

_preemption: dict = {"installed": False, "signal": 0}


class PreemptionRequested(KeyboardInterrupt):
    """A preemption signal arrived. A subclass of KeyboardInterrupt, so the RL loop's Ctrl-C path
    (write a checkpoint, then exit) handles it; ``care-train --resume`` continues from that checkpoint."""

    def __init__(self, signum: int):
        super().__init__(f"received {signal.Signals(signum).name}")
        self.signum = signum


def install_preemption_handlers(signals=PREEMPTION_SIGNALS) -> None:
    """Record preemption signals instead of dying on them; :func:`check_preemption` acts on them.

    The handler only records the signal: raising inside it could interrupt one rank between two
    collectives that the other ranks are already blocked in, and the checkpoint (itself collective)
    would then hang. The RL loop checks at each step boundary, where every rank is at the same point.
    """
    def record(signum, frame):
        if not _preemption["signal"]:
            logging.getLogger(__name__).warning("%s received: checkpointing at the end of this step, then exiting",
                                                signal.Signals(signum).name)
        _preemption["signal"] = signum

    for sig in signals:
        signal.signal(sig, record)
    _preemption["installed"] = True


def max_over_ranks(value: float, group=None) -> float:
    """The largest ``value`` over the ranks of ``group`` (``value`` itself without torch.distributed);
    a host-side collective run on the group's device (NCCL refuses CPU tensors), so every rank of
    ``group`` must call it."""
    from care_megatron.training.megatron.parallel_state import all_reduce_host_values
    import torch.distributed as dist

    return float(all_reduce_host_values([value], group, op=dist.ReduceOp.MAX)[0])


def check_preemption() -> None:
    """Raise :class:`PreemptionRequested` when this rank, or any rank, received a preemption signal.

    Under torch.distributed every rank calls this at the same point (the top of an RL step), and the
    flag is max-reduced over the world, so all ranks stop together even when only some got the signal.
    A no-op (no collective) unless :func:`install_preemption_handlers` ran in this process.
    """
    if not _preemption["installed"]:
        return
    signum = int(_preemption["signal"])
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        signum = int(max_over_ranks(signum, dist.group.WORLD))
    if signum:
        raise PreemptionRequested(signum)
