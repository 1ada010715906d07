"""The SGLang API surface, faked at the one import point of ``care_megatron.rollout.sglang_engine``.

``FakeEngine`` records calls and answers like ``sglang.Engine`` (generate dicts with ``output_ids`` /
``meta_info``; ``(success, message)`` from weight updates). ``FakeSerializer`` pickles what it is
given; the engine unpickles each rank's payload and rebuilds the bucket as SGLang's loader does, so
bucket serialisation is checked end to end on CPU tensors.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass

import torch

from care_megatron.rollout import sglang_engine as se


@dataclass
class FakeMetadata:
    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


class FakeSerializer:
    @staticmethod
    def serialize(obj):
        return pickle.dumps(obj)


class FakeEngine:
    """Mimics sglang.Engine: records calls, keeps a weight table, echoes scripted generations."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list[tuple[str, dict]] = []
        self.weights: dict[str, torch.Tensor] = {}
        self.script: list[list[dict]] = []

    def generate(self, **kwargs):
        self.calls.append(("generate", kwargs))
        return self.script.pop(0)

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        self.calls.append(("update_weights_from_tensor", dict(n=len(named_tensors), load_format=load_format,
                                                              flush_cache=flush_cache)))
        assert load_format == "flattened_bucket"
        self.received_by_rank = []
        for payload in named_tensors:  # each TP rank deserialises its own copy
            bucket = pickle.loads(payload)
            self.received_by_rank.append(bucket)
            for name, tensor in se.unflatten_bucket(bucket["flattened_tensor"], bucket["metadata"]):
                self.weights[name] = tensor.clone()
        return True, "Succeeded"

    def init_weights_update_group(self, **kwargs):
        self.calls.append(("init_weights_update_group", kwargs))
        return True, "ok"

    def update_weights_from_distributed(self, names, dtypes, shapes, group_name, flush_cache):
        self.calls.append(("update_weights_from_distributed", dict(names=names, dtypes=dtypes, shapes=shapes,
                                                                   group_name=group_name, flush_cache=flush_cache)))
        for name, dtype, shape in zip(names, dtypes, shapes):
            received = self.channel.get(timeout=10)  # blocks like an NCCL receive, in broadcast order
            assert str(received.dtype) == f"torch.{dtype}" and list(received.shape) == shape
            self.weights[name] = received
        return True, "ok"

    def flush_cache(self):
        self.calls.append(("flush_cache", {}))

    def release_memory_occupation(self, tags=None):
        self.calls.append(("release_memory_occupation", {"tags": tags}))

    def resume_memory_occupation(self, tags=None):
        self.calls.append(("resume_memory_occupation", {"tags": tags}))

    def shutdown(self):
        self.calls.append(("shutdown", {}))


def fake_api(version="0.5.4"):
    return se.SGLangAPI(version=version, Engine=FakeEngine, MultiprocessingSerializer=FakeSerializer,
                        FlattenedTensorMetadata=FakeMetadata)
