"""Hugging Face directories: lazy safetensors reading, sharded writing, non-weight asset copying."""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Iterator, Optional

import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")
DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3


class LazySafetensors(Mapping):
    """Read-only mapping ``name -> tensor`` over an HF directory's safetensors files.

    Nothing is read until a tensor is requested; each request opens the file, copies that one
    tensor out and closes (unmaps) it again, so converting tensor by tensor keeps at most the tensors
    in flight in memory, never a second copy of the checkpoint (a cached memory map would keep every
    page read so far resident). Re-opening costs one header parse per tensor.
    """

    def __init__(self, directory: str):
        from safetensors import safe_open

        self.directory = directory
        index_path = os.path.join(directory, "model.safetensors.index.json")
        single_path = os.path.join(directory, "model.safetensors")
        if os.path.exists(index_path):
            with open(index_path) as handle:
                self._file_of = dict(json.load(handle)["weight_map"])
        elif os.path.exists(single_path):
            with safe_open(single_path, "pt") as handle:
                self._file_of = {name: "model.safetensors" for name in handle.keys()}
        else:
            raise FileNotFoundError(f"{directory} holds neither model.safetensors nor model.safetensors.index.json "
                                    "(only safetensors checkpoints are supported)")
    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self._file_of:
            raise KeyError(name)
        with safe_open(os.path.join(self.directory, self._file_of[name]), "pt") as handle:
            return handle.get_tensor(name).clone()

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def dtype(self) -> torch.dtype:
        """dtype of the first floating-point tensor (the checkpoint's storage dtype)."""
        from safetensors import safe_open

        for filename in sorted(set(self._file_of.values())):
            with safe_open(os.path.join(self.directory, filename), "pt") as handle:
                for name in handle.keys():
                    dtype = {"F32": torch.float32, "BF16": torch.bfloat16,
                             "F16": torch.float16}.get(handle.get_slice(name).get_dtype())
                    if dtype is not None:
                        return dtype
        return torch.float32


class ShardedSafetensorsWriter:
    """Accumulate named tensors and write ``model-0000i-of-0000n.safetensors`` files plus the index.

    Holds at most one shard (``max_shard_bytes``) in memory. A single-shard model is written as
    ``model.safetensors`` without an index, as ``save_pretrained`` does.
    """

    def __init__(self, directory: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        os.makedirs(directory, exist_ok=True)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        temporary = f"part-{len(self._files):05d}.safetensors"
        save_file(self._pending, os.path.join(self.directory, temporary), metadata={"format": "pt"})
        self._files.append((temporary, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Flush, give the files their final names, write the index; returns the file names."""
        if self._pending:
            self._flush()
        if len(self._files) == 1:
            os.replace(os.path.join(self.directory, self._files[0][0]), os.path.join(self.directory, "model.safetensors"))
            return ["model.safetensors"]
        total = len(self._files)
        weight_map, names = {}, []
        for i, (temporary, tensor_names) in enumerate(self._files):
            final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            os.replace(os.path.join(self.directory, temporary), os.path.join(self.directory, final))
            weight_map.update({tensor_name: final for tensor_name in tensor_names})
            names.append(final)
        with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as handle:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, handle, indent=2)
        return names


def copy_hf_assets(source: str, destination: str) -> list[str]:
    """Copy every non-weight file (config, generation config, tokenizer, processor, chat template)."""
    os.makedirs(destination, exist_ok=True)
    copied = []
    for entry in sorted(os.listdir(source)):
        path = os.path.join(source, entry)
        if os.path.isfile(path) and not entry.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(path, os.path.join(destination, entry))
            copied.append(entry)
    return copied


def torch_dtype_of(name: Optional[str]) -> Optional[torch.dtype]:
    """``"bfloat16"`` -> ``torch.bfloat16``; None passes through; ValueError on other names."""
    if name is None:
        return None
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(table)}")
    return table[name]
