"""A check, for the CPU (gloo) distributed tests, that no collective would get a host tensor on a group
that is NCCL in a GPU run.

On CPU every tensor is on the CPU, so a collective over a group that NCCL serves on GPU ("No backend
type associated with device type cpu") cannot fail here by itself. The guard tells the two kinds of
tensor apart by where they came from, which is what decides their device on GPU:

* *host* tensors: made by a factory (``torch.tensor``, ``torch.zeros`` ...) without a ``device``
  argument, or by ``.cpu()``, and what is computed from host tensors only. On GPU they are CPU
  tensors.
* everything else (parameters moved with ``.to(device)``, activations, tensors made with an explicit
  ``device=``, a host tensor after ``.to(device)``) lives on the accelerator on GPU.

Every group counts as NCCL-like (Megatron's TP / PP / DP / CP groups and the default group are NCCL on
GPU); a tensor collective that receives a host tensor raises :class:`HostTensorOnNcclGroup`. Object
collectives pickle on the side and are not checked. Enabled per process with :func:`install` (the
distributed test workers call it when ``CARE_COLLECTIVE_GUARD`` is not ``0``).
"""
from __future__ import annotations

import functools
import os
import weakref

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

# isend / irecv stay unwrapped: P2POp checks its op is torch's own function; their tensors are checked
# where Megatron's p2p hands them over, in batch_isend_irecv
TENSOR_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
                      "broadcast", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single", "send", "recv",
                      "batch_isend_irecv")
FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
             torch.linspace, torch.rand, torch.randn, torch.randint, torch.eye, torch.from_numpy}


class HostTensorOnNcclGroup(RuntimeError):
    pass


class _HostTensorTracker(TorchFunctionMode):
    """Marks host tensors and propagates the mark through every op (see module docstring)."""

    def __init__(self):
        super().__init__()
        self.host: dict[int, weakref.ref] = {}  # id -> weak reference (tensors compare by value, not identity)

    def is_host(self, tensor) -> bool:
        ref = self.host.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
        return ref is not None and ref() is tensor

    def _mark(self, tensor, host: bool) -> None:
        key = id(tensor)
        if not host:
            self.host.pop(key, None)
            return

        def forget(ref, key=key, host=self.host):
            if host.get(key) is ref:
                del host[key]

        self.host[key] = weakref.ref(tensor, forget)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if func in FACTORIES:
            mark = kwargs.get("device") is None
        elif name in ("to", "cuda") and not (name == "to" and _dtype_only(args[1:], kwargs)):
            mark = False  # placed on a device explicitly: on GPU this is the accelerator
        elif name in ("cpu",):
            mark = True
        else:  # on GPU an op with any accelerator input runs there (0-dim / index CPU inputs are allowed)
            inputs = _tensors(args) + _tensors(list(kwargs.values()))
            mark = bool(inputs) and all(self.is_host(t) for t in inputs)
        for t in _tensors([out]):
            self._mark(t, mark)
        return out


def _dtype_only(args, kwargs) -> bool:
    if "device" in kwargs:
        return False
    return all(isinstance(a, (torch.dtype, bool)) for a in args)


def _tensors(items) -> list:
    out = []
    for item in items:
        if isinstance(item, torch.Tensor):
            out.append(item)
        elif isinstance(item, (list, tuple)):
            out += _tensors(item)
    return out


_TRACKER: _HostTensorTracker | None = None
VIOLATIONS: list[str] = []


def _guarded(name, real):
    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        if _TRACKER is not None:
            items = list(args) + list(kwargs.values())
            if name == "batch_isend_irecv":
                items = [op.tensor for op in items[0]]
            hosts = [t for t in _tensors(items) if _TRACKER.is_host(t)]
            if hosts:
                message = (f"torch.distributed.{name} got a host tensor (shape {tuple(hosts[0].shape)}, "
                           f"{hosts[0].dtype}) on a group that is NCCL on GPU: NCCL rejects CPU tensors")
                VIOLATIONS.append(message)
                raise HostTensorOnNcclGroup(message)
        return real(*args, **kwargs)

    wrapper._care_guarded = True
    return wrapper


def install() -> bool:
    """Start tracking host tensors in this process and check every tensor collective; idempotent.
    Returns False when disabled by ``CARE_COLLECTIVE_GUARD=0``."""
    global _TRACKER
    if os.environ.get("CARE_COLLECTIVE_GUARD", "1") == "0":
        return False
    if _TRACKER is None:
        for name in TENSOR_COLLECTIVES:
            real = getattr(dist, name, None)
            if real is not None and not getattr(real, "_care_guarded", False):
                setattr(dist, name, _guarded(name, real))
        _TRACKER = _HostTensorTracker()
        _TRACKER.__enter__()
    return True


def is_host_tensor(tensor) -> bool:
    return _TRACKER is not None and _TRACKER.is_host(tensor)
