"""Resumable checkpoints: written atomically (temp dir + rename), newest N kept, newest usable found on resume.

A checkpoint directory ``step_000123/`` holds ``backend`` (model, optimizer, scheduler: a file for the
plain-PyTorch backend, a distributed-checkpoint directory for Megatron), ``trainer.pt`` (step,
data-iterator position, counters), ``rng/rank_NNNNN.pt`` (each rank's own python / numpy / torch /
CUDA RNG states: data-parallel ranks draw different streams, so one rank's state restored on all
would change what the others draw after a resume) and, written last, ``complete.json`` (every
file's size). A run killed at any moment leaves either the previous complete checkpoint or the new
one, never a half-written directory under a final name; a checkpoint damaged afterwards (a file
truncated or missing, one that no longer loads) is skipped on resume for the previous one.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from care_megatron.config.schema import ConfigError

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
MARKER = "complete.json"
"""Written last into a checkpoint: its step, world size and the size of every file it holds."""
RNG_DIR = "rng"


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


def rng_file(rank: int) -> str:
    """Where rank ``rank``'s RNG states live inside a checkpoint."""
    return f"{RNG_DIR}/rank_{rank:05d}.pt"


def checkpoint_problem(path: str | Path) -> str | None:
    """Why the checkpoint at ``path`` is incomplete (no marker, a listed file missing or of another
    size than when it was written, e.g. truncated), or None when every file is there whole."""
    path = Path(path)
    try:
        files = json.loads((path / MARKER).read_text())["files"]
        listed = [(str(name), int(size)) for name, size in files.items()]
    except FileNotFoundError:
        return f"no {MARKER} (not written to the end, or copied in part)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"unreadable {MARKER}: {exc}"
    for name, size in listed:
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} when written (truncated?)"
    return None


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (see :func:`checkpoint_problem`), or None."""
    ckpts = [p for p in list_checkpoints(root) if checkpoint_problem(p) is None]
    return ckpts[-1] if ckpts else None


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _barrier() -> None:
    if (dist := _dist()) is not None:
        dist.barrier()


def _rank_and_world() -> tuple[int, int]:
    dist = _dist()
    return (0, 1) if dist is None else (dist.get_rank(), dist.get_world_size())


def _on_any_rank(flag: bool) -> bool:
    """``flag`` or-ed over every rank (a collective under torch.distributed), so all ranks take the
    same branch: skipping a checkpoint on one rank only would load two different states."""
    dist = _dist()
    if dist is None:
        return flag
    from care_megatron.training.megatron.parallel_state import all_reduce_host_values

    return bool(all_reduce_host_values([float(flag)], dist.group.WORLD, op=dist.ReduceOp.MAX)[0])


def _write_marker(directory: Path, step: int, world_size: int) -> None:
    files = {str(f.relative_to(directory)): f.stat().st_size for f in sorted(directory.rglob("*")) if f.is_file()}
    files.pop(MARKER, None)  # a marker being rewritten does not list itself
    (directory / MARKER).write_text(json.dumps({"step": step, "world_size": world_size, "files": files}, indent=1))


def save_checkpoint(root: str | Path, step: int, backend, trainer_state: dict[str, Any], keep_last: int) -> Path:
    """Write ``root/step_{step}`` atomically, then delete all but the newest ``keep_last``.

    Collective under torch.distributed: every rank calls it; the backend writes its own shards (a
    Megatron distributed checkpoint is collective) and every rank its RNG states; rank 0 writes the
    trainer state, then the completeness marker, and renames.
    """
    root = Path(root)
    rank, world_size = _rank_and_world()
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / RNG_DIR).mkdir(parents=True)
    _barrier()
    backend.save_checkpoint(str(tmp / "backend"))
    torch.save(rng_state(), tmp / rng_file(rank))
    _barrier()
    if rank == 0:
        torch.save({**trainer_state, "step": step, "world_size": world_size}, tmp / "trainer.pt")
        _write_marker(tmp, step, world_size)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _load_errors() -> tuple[type[BaseException], ...]:
    """What a damaged checkpoint raises on load: ordinary exceptions (torch.load of a truncated file:
    RuntimeError / EOFError / UnpicklingError), and torch.distributed.checkpoint's CheckpointException,
    which derives from BaseException and is raised on every rank when any rank's read fails."""
    try:
        from torch.distributed.checkpoint.api import CheckpointException
    except ImportError:
        return (Exception,)
    return (Exception, CheckpointException)


def _summary(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:300]


def _read_trainer_and_rng(path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``trainer.pt`` and this rank's RNG states (None when the checkpoint was written at another
    world size: the ranks' streams have no counterpart then, and they stay as seeded)."""
    state = torch.load(path / "trainer.pt", weights_only=False)
    rank, world_size = _rank_and_world()
    if int(state["world_size"]) != world_size:
        if rank == 0:
            log.warning("%s was written by %d ranks, this run has %d: RNG states are not restored",
                        path, state["world_size"], world_size)
        return state, None
    return state, torch.load(path / rng_file(rank), weights_only=False)


def _try_load(path: Path, backend, errors) -> tuple[dict[str, Any] | None, str]:
    """Restore ``path`` into ``backend`` and this rank's RNG; ``(trainer state, "")``, or ``(None,
    why not)`` with the backend possibly half-loaded (the next checkpoint loaded overwrites it).
    Every rank decides together, at each stage."""
    problem = checkpoint_problem(path)
    state = rng = None
    if problem is None:
        try:
            state, rng = _read_trainer_and_rng(path)
        except errors as exc:
            problem = f"trainer state: {_summary(exc)}"
    if _on_any_rank(problem is not None):
        return None, problem or "unusable on another rank"
    try:
        backend.load_checkpoint(str(path / "backend"))
    except errors as exc:
        problem = f"backend: {_summary(exc)}"
    if _on_any_rank(problem is not None):
        return None, problem or "the backend did not load on another rank"
    if rng is not None:
        set_rng_state(rng)
    return state, ""


def load_latest_checkpoint(root: str | Path, backend) -> tuple[Path, dict[str, Any]] | None:
    """Restore the newest usable checkpoint under ``root`` into ``backend`` (and this rank's RNG
    states); return its path and trainer state, or None when ``root`` holds no checkpoint.

    A newest checkpoint that is incomplete or does not load is passed over for the one before, with
    a warning naming both; when checkpoints exist but none is usable, :class:`ConfigError` on
    ``train.output_dir`` says why each was refused. Collective under torch.distributed.
    """
    root = Path(root)
    candidates = list_checkpoints(root)
    if not candidates:
        return None
    errors = _load_errors()
    refused: list[str] = []
    for path in reversed(candidates):
        state, problem = _try_load(path, backend, errors)
        if state is not None:
            if refused:
                log.warning("--resume: skipped %s; resuming from %s, the newest complete checkpoint",
                            "; ".join(refused), path)
            return path, state
        refused.append(f"{path} ({problem})")
    raise ConfigError("train.output_dir", f"--resume found no usable checkpoint in {root}: {'; '.join(refused)}; "
                                          f"move that folder away to start the run over, or point train.output_dir "
                                          f"at another run")

