"""Moving a trainer's accelerator storages to host memory and back (colocated sleep / wake).

Three kinds of storage, three treatments:

* **kept** (weights, fp32 master weights, Adam moments, the reference model): copied into one host
  buffer, then freed on the device; copied back on restore.
* **dropped** (gradient buffers, ``grad`` / Megatron's ``main_grad``): freed without a copy and
  zero-filled on restore, because the next step zeroes them anyway.
* a **subset restored on its own** (the policy weights for a weight export while asleep): brought back
  alone, then freed again without a copy, since the host copy is still current.

The host buffer is one flat byte tensor sized exactly to the kept storages, allocated once and reused
by every later sleep of the same size. On CUDA it is page-locked with ``cudaHostRegister`` rather than
allocated with ``pin_memory=True``: PyTorch's caching host allocator rounds each block up to a power
of two and never hands it back, which for tens of GiB of optimizer state wastes up to as much again.
Storages are freed with ``resize_(0)``, so every view of them (Megatron DDP's bucket views, optimizer
shards) stays valid across the cycle.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class _Entry:
    storage: torch.UntypedStorage
    nbytes: int
    host_offset: int | None   # None: dropped (zero-filled on restore)
    resident: bool = False


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor over the whole storage (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _unique_storages(tensors) -> list[torch.UntypedStorage]:
    seen, out = set(), []
    for tensor in tensors:
        if tensor is None:
            continue
        storage = tensor.untyped_storage()
        key = storage._cdata  # the storage's identity (its data pointer is 0 for every freed storage)
        if key in seen or storage.nbytes() == 0:
            continue
        seen.add(key)
        out.append(storage)
    return out


class HostOffloader:
    """Offloads storages to one reusable host buffer; see the module docstring."""

    def __init__(self, pin: bool | None = None):
        self.pin = pin            # None: page-lock when a kept storage lives on CUDA
        self.host: torch.Tensor | None = None
        self._pinned = False
        self.entries: list[_Entry] = []
        self.allocations = 0      # host buffers allocated so far (a steady cycle allocates once)

    @property
    def asleep(self) -> bool:
        return bool(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def offload(self, keep=(), drop=()) -> None:
        """Free the storages of ``keep`` (copied to the host first) and of ``drop`` (not copied).
        A storage named in both is kept; views of one storage count once."""
        if self.entries:
            raise RuntimeError("HostOffloader.offload: already offloaded; restore() first")
        kept = _unique_storages(keep)
        kept_keys = {s._cdata for s in kept}
        dropped = [s for s in _unique_storages(drop) if s._cdata not in kept_keys]
        offset, entries = 0, []
        for storage in kept:
            entries.append(_Entry(storage, storage.nbytes(), offset))
            offset += storage.nbytes()
        entries += [_Entry(storage, storage.nbytes(), None) for storage in dropped]
        self._ensure_host(offset, any(s.device.type == "cuda" for s in kept))
        for entry in entries:
            if entry.host_offset is not None:
                self.host[entry.host_offset:entry.host_offset + entry.nbytes].copy_(_bytes_of(entry.storage),
                                                                                     non_blocking=True)
        _synchronize(entries)  # the host copies are complete before their sources are freed
        for entry in entries:
            entry.storage.resize_(0)
        self.entries = entries

    def restore(self, tensors=None) -> None:
        """Bring back every offloaded storage (``tensors`` None: the offloader is then empty), or only
        the storages of ``tensors`` (for :meth:`release` to free again)."""
        if tensors is None:
            chosen = self.entries
        else:
            keys = {t.untyped_storage()._cdata for t in tensors if t is not None}
            chosen = [e for e in self.entries if e.storage._cdata in keys]
        for entry in chosen:
            if entry.resident:
                continue
            entry.storage.resize_(entry.nbytes)
            target = _bytes_of(entry.storage)
            if entry.host_offset is None:
                target.zero_()
            else:
                target.copy_(self.host[entry.host_offset:entry.host_offset + entry.nbytes], non_blocking=True)
            entry.resident = True
        _synchronize(chosen)
        if tensors is None:
            self.entries = []

    def release(self) -> None:
        """Free again, without copying, the storages a partial :meth:`restore` brought back: their
        host copies are current as long as nothing wrote to them in between (a weight export reads)."""
        for entry in self.entries:
            if entry.resident:
                entry.storage.resize_(0)
                entry.resident = False

    def _ensure_host(self, nbytes: int, on_cuda: bool) -> None:
        if self.host is not None and self.host.numel() == nbytes:
            return
        self._free_host()
        self.host = torch.empty(nbytes, dtype=torch.uint8)
        self.allocations += 1
        if (self.pin if self.pin is not None else on_cuda) and nbytes > 0:
            error = int(torch.cuda.cudart().cudaHostRegister(self.host.data_ptr(), nbytes, 1))  # 1: cudaHostRegisterPortable
            if error != 0:
                raise RuntimeError(f"cudaHostRegister of the {nbytes}-byte sleep buffer failed (cudaError {error})")
            self._pinned = True

    def _free_host(self) -> None:
        if self._pinned:
            torch.cuda.cudart().cudaHostUnregister(self.host.data_ptr())
            self._pinned = False
        self.host = None

    def __del__(self):
        try:
            self._free_host()
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass


def _synchronize(entries) -> None:
    if any(e.storage.device.type == "cuda" for e in entries):
        torch.cuda.synchronize()
