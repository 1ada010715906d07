"""Choosing between a fused Triton kernel and its torch reference.

Every fused op in :mod:`care_megatron.kernels` has two implementations: ``reference`` (pure
torch, runs anywhere) and ``triton``; an op may also have a ``torch`` one (the reference's
arithmetic, bit for bit, with fewer memory passes: the LM-head log-probs' chunk ops), and ops
without it run their reference under that name. The default is chosen per call from the input
tensors: Triton when they live on a CUDA device and ``triton`` imports, ``torch`` otherwise (the
nanochat pattern: fast path chosen at import, reference as fallback). Tests force either with
:func:`force_kernel_backend` (or the ``CARE_KERNEL_BACKEND`` environment variable); forcing
``triton`` on CPU tensors runs the kernels in Triton's interpreter (numpy, needs
``TRITON_INTERPRET=1`` before triton is imported), which is how the CPU test-suite checks the
kernels' arithmetic.

Kernels are written as plain Python functions and turned into Triton kernels lazily by
:func:`jit_for_device`, so importing this package never compiles anything and a missing GPU only
matters when a kernel actually runs.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import torch

BACKENDS = ("auto", "reference", "torch", "triton")

_forced_backend: str = os.environ.get("CARE_KERNEL_BACKEND", "auto")
if _forced_backend not in BACKENDS:
    raise ValueError(f"CARE_KERNEL_BACKEND={_forced_backend!r}: expected one of {BACKENDS}")

try:  # triton is optional: the CPU wheel of torch may come without it
    import triton  # noqa: F401

    TRITON_AVAILABLE = True
    _TRITON_IMPORT_ERROR: Exception | None = None
except Exception as error:  # pragma: no cover - depends on the environment
    TRITON_AVAILABLE = False
    _TRITON_IMPORT_ERROR = error


def set_kernel_backend(name: str) -> None:
    """Force every fused op to ``name`` ("reference", "torch" or "triton"), or back to "auto"."""
    global _forced_backend
    if name not in BACKENDS:
        raise ValueError(f"kernel backend {name!r}: expected one of {BACKENDS}")
    if name == "triton" and not TRITON_AVAILABLE:
        raise ValueError(f"kernel backend 'triton' requested but triton does not import: {_TRITON_IMPORT_ERROR}")
    _forced_backend = name


def get_kernel_backend() -> str:
    """The forced backend ("auto" when none is forced)."""
    return _forced_backend


@contextlib.contextmanager
def force_kernel_backend(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_kernel_backend` (tests use it to pin a path)."""
    previous = _forced_backend
    set_kernel_backend(name)
    try:
        yield
    finally:
        set_kernel_backend(previous)


def resolve_backend(device: torch.device) -> str:
    """The implementation a fused op should use for tensors on ``device``."""
    if _forced_backend != "auto":
        return _forced_backend
    if not TRITON_AVAILABLE:
        return "torch"
    # CPU tensors take torch even under TRITON_INTERPRET=1: the interpreter is orders of
    # magnitude slower than torch, so it only runs when a test forces the "triton" backend.
    return "triton" if device.type == "cuda" else "torch"


def interpreter_active() -> bool:
    """True when Triton was imported in interpreter mode (``TRITON_INTERPRET=1`` set before import).

    Triton fixes the mode of its own language helpers (``tl.max``, ``tl.sum``...) when it is first
    imported, so setting the variable later is not enough: the interpreter then fails inside the
    kernel. Tests check this and otherwise re-run themselves in a fresh process.
    """
    if not TRITON_AVAILABLE:
        return False
    import triton.language as tl

    return type(tl.max).__name__ == "InterpretedFunction"


_KERNEL_CACHE: dict[Callable, object] = {}


def jit_for_device(kernel_fn: Callable, device: torch.device):
    """``triton.jit(kernel_fn)`` (cached), checking that the device can run it.

    CUDA tensors run compiled kernels; any other device needs the interpreter, which must have been
    switched on before triton was imported (see :func:`interpreter_active`).
    """
    import triton

    if device.type != "cuda" and not interpreter_active():
        raise RuntimeError(
            f"Triton kernel {kernel_fn.__name__} on a {device.type} tensor needs Triton's interpreter: "
            "set TRITON_INTERPRET=1 before anything imports triton (megatron.core does), or use the "
            "reference backend"
        )
    if kernel_fn not in _KERNEL_CACHE:
        _KERNEL_CACHE[kernel_fn] = triton.jit(kernel_fn)
    return _KERNEL_CACHE[kernel_fn]
