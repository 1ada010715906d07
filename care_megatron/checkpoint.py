"""Resumable checkpoints: written atomically (temp dir + rename), newest N kept, newest found on resume.

A checkpoint directory ``step_000123/`` holds ``backend`` (model, optimizer, scheduler: a file for the
plain-PyTorch backend, a distributed-checkpoint directory for Megatron) and ``trainer.pt`` (step, RNG states, data-iterator position, counters). A
run killed at any moment leaves either the previous complete checkpoint or the new one, never a
half-written directory under a final name.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = [p for p in list_checkpoints(root) if (p / "trainer.pt").exists()]
    return ckpts[-1] if ckpts else None


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _barrier() -> None:
    if (dist := _dist()) is not None:
        dist.barrier()


def save_checkpoint(root: str | Path, step: int, backend, trainer_state: dict[str, Any], keep_last: int) -> Path:
    """Write ``root/step_{step}`` atomically, then delete all but the newest ``keep_last``.

    Collective under torch.distributed: every rank calls it; the backend writes its own shards (a
    Megatron distributed checkpoint is collective), rank 0 writes the trainer state and renames.
    """
    root = Path(root)
    dist = _dist()
    main = dist is None or dist.get_rank() == 0
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    if main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    backend.save_checkpoint(str(tmp / "backend"))
    _barrier()
    if main:
        torch.save({**trainer_state, "step": step, "rng": rng_state()}, tmp / "trainer.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: str | Path, backend) -> dict[str, Any]:
    """Restore the backend from ``path`` and return the trainer state (RNG states already restored)."""
    path = Path(path)
    backend.load_checkpoint(str(path / "backend"))
    state = torch.load(path / "trainer.pt", weights_only=False)
    set_rng_state(state["rng"])
    return state
