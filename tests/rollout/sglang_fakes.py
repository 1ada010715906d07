"""The SGLang API surface, faked at the one import point of ``care_megatron.rollout.sglang_engine``.

``FakeEngine`` answers like ``sglang.Engine`` of the version it fakes, where the adapter's
correctness depends on it (checked against the wheel-extracted ``sglang_signatures.json`` by
``test_sglang_conformance.py``):

* construction takes only ``ServerArgs`` fields of that version (``TypeError`` otherwise);
* ``generate`` returns dicts with ``output_ids`` / ``meta_info`` (scripted), computes the image
  tokens SGLang would give each image (its smart resize: factor 28, pixels in [4 * 784, 16384 * 784]),
  and refuses to run while memory is released or from released weights that were not sent again;
* ``update_weights_from_tensor`` unpickles each rank's payload and rebuilds the bucket as SGLang's
  loader does (so bucket serialisation is checked end to end on CPU tensors), answers
  ``(success, message)``, and fails while the weights are released;
* ``release_memory_occupation(tags)`` / ``resume_memory_occupation(tags)`` keep SGLang's set of
  offloaded tags (None or empty means every tag of the version; resuming a tag that was not
  released raises ``KeyError`` as ``set.remove`` does there); releasing the weights turns them into
  garbage (NaN), as SGLang's memory saver frees them without a CPU copy. Stricter than SGLang in
  one place: a tag the version does not know (``cuda_graph`` on 0.5.3) is refused instead of ignored.
"""
from __future__ import annotations

import json
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from packaging.version import Version

from care_megatron.rollout import sglang_engine as se

SIGNATURES = json.loads((Path(__file__).with_name("sglang_signatures.json")).read_text())["versions"]
"""The wheel-extracted API table (``tools/extract_sglang_signatures.py``)."""

STARTUP_WEIGHTS = "<weights loaded from model_path>"


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


def sglang_image_tokens(width: int, height: int, merge: int = 2) -> int:
    """Image tokens SGLang's Qwen-VL path gives a ``width`` x ``height`` image: its smart resize
    (round to a multiple of 28, then scale into its pixel bounds), then one token per merged patch."""
    factor = se.SGLANG_IMAGE_FACTOR
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > se.SGLANG_MAX_IMAGE_PIXELS:
        beta = math.sqrt(height * width / se.SGLANG_MAX_IMAGE_PIXELS)
        h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < se.SGLANG_MIN_IMAGE_PIXELS:
        beta = math.sqrt(se.SGLANG_MIN_IMAGE_PIXELS / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    patch = factor // merge
    return (h_bar // patch) * (w_bar // patch) // (merge * merge)


class FakeEngine:
    """Mimics ``sglang.Engine`` of ``version``: records calls, keeps a weight table, echoes scripted generations."""

    version = "0.5.23"

    def __init__(self, **kwargs):
        unknown = sorted(set(kwargs) - set(SIGNATURES[self.version]["server_args"]))
        if unknown:
            raise TypeError(f"ServerArgs.__init__() got unexpected keyword argument(s) {unknown}")
        self.kwargs = kwargs
        self.calls: list[tuple[str, dict]] = []
        self.weights: dict[str, torch.Tensor] = {}
        self.script: list[list[dict]] = []
        self.offload_tags: set[str] = set()
        self.lost_weights: set[str] = set()
        """Weights released and not received since (SGLang would decode from freed memory)."""
        self.image_token_counts: list[list[int]] = []
        """Per generated request with images: the image tokens SGLang computed for each image."""

    @property
    def memory_types(self) -> list[str]:
        return sorted(SIGNATURES[self.version]["memory_tags"].values())

    def generate(self, prompt=None, sampling_params=None, input_ids=None, image_data=None, return_logprob=False,
                 logprob_start_len=None):
        kwargs = {k: v for k, v in dict(prompt=prompt, sampling_params=sampling_params, input_ids=input_ids,
                                        image_data=image_data, return_logprob=return_logprob,
                                        logprob_start_len=logprob_start_len).items() if v is not None}
        self.calls.append(("generate", kwargs))
        if self.offload_tags:
            raise RuntimeError(f"generate while {sorted(self.offload_tags)} released: SGLang would fault")
        if self.lost_weights:
            raise RuntimeError(f"generate from released weights never sent again ({len(self.lost_weights)} tensors, "
                               f"e.g. {sorted(self.lost_weights)[0]!r}): the completions would be garbage")
        for images in image_data or []:
            self.image_token_counts.append([sglang_image_tokens(*im.size) for im in images])
        return self.script.pop(0)

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        self.calls.append(("update_weights_from_tensor", dict(n=len(named_tensors), load_format=load_format,
                                                              flush_cache=flush_cache)))
        if "weights" in self.offload_tags:
            raise RuntimeError("update_weights_from_tensor while the weights are released: SGLang would fault")
        assert load_format == "flattened_bucket"
        self.received_by_rank = []
        for payload in named_tensors:  # each TP rank deserialises its own copy
            bucket = pickle.loads(payload)
            self.received_by_rank.append(bucket)
            for name, tensor in se.unflatten_bucket(bucket["flattened_tensor"], bucket["metadata"]):
                self.weights[name] = tensor.clone()
                self.lost_weights.discard(name)
        # the fake cannot tell a full sync from a partial one of weights it never saw: any update
        # replaces the start-up weights
        self.lost_weights.discard(STARTUP_WEIGHTS)
        return True, "Succeeded"

    def flush_cache(self):
        self.calls.append(("flush_cache", {}))

    def _tags(self, tags):
        tags = list(tags) if tags else self.memory_types
        unknown = sorted(set(tags) - set(self.memory_types))
        if unknown:
            raise ValueError(f"SGLang {self.version} has no memory tag(s) {unknown}")
        return tags

    def release_memory_occupation(self, tags=None):
        self.calls.append(("release_memory_occupation", {"tags": tags}))
        tags = self._tags(tags)
        self.offload_tags.update(tags)
        if "weights" in tags:
            self.lost_weights = set(self.weights) or {STARTUP_WEIGHTS}
            for name, tensor in self.weights.items():
                self.weights[name] = torch.full_like(tensor, float("nan"))

    def resume_memory_occupation(self, tags=None):
        self.calls.append(("resume_memory_occupation", {"tags": tags}))
        for tag in self._tags(tags):
            self.offload_tags.remove(tag)  # KeyError for a tag not released, as in SGLang

    def shutdown(self):
        self.calls.append(("shutdown", {}))


FAKED_VERSIONS = sorted(SIGNATURES, key=Version)
"""The SGLang versions the table (and so the fake) covers, oldest first."""


def fake_api(version: str = FAKED_VERSIONS[-1]) -> se.SGLangAPI:
    """The SGLang API surface of ``version``; a version outside the table (the version-check tests
    ask for unsupported ones) behaves like the newest tabled one but reports its own number."""
    table = version if version in SIGNATURES else FAKED_VERSIONS[-1]
    engine_cls = type(f"FakeEngine_{table.replace('.', '_')}", (FakeEngine,), {"version": table})
    return se.SGLangAPI(version=version, Engine=engine_cls, MultiprocessingSerializer=FakeSerializer,
                        FlattenedTensorMetadata=FakeMetadata,
                        cuda_graph_memory_tag="GPU_MEMORY_TYPE_CUDA_GRAPH" in SIGNATURES[table]["memory_tags"])
