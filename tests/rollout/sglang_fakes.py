"""The SGLang API surface, faked at the one import point of ``care_megatron.rollout.sglang_engine``.

``FakeEngine`` answers like ``sglang.Engine`` of the version it fakes where the adapter's
correctness depends on it, keyed on the wheel-extracted ``sglang_signatures.json`` (checked by
``test_sglang_conformance.py``):

* construction takes only ``ServerArgs`` fields of that version (``TypeError`` otherwise), refuses
  to start with torchrun's ``TORCHELASTIC_USE_AGENT_STORE=True`` in the environment (the real
  schedulers' tcp:// rendezvous waits for a TCPStore server nobody starts, torch
  ``distributed/rendezvous.py``), reads ``SGLANG_VLM_CACHE_SIZE_MB`` as its schedulers do, and writes
  the NCCL / CUDA variables ``_set_envs_and_config`` writes into the caller's environment;
* ``generate`` returns dicts with ``output_ids`` / ``meta_info`` (scripted); raises ``ValueError`` for
  the whole call when one request is too long for the context (``TokenizerManager._validate_one_request``:
  0.5.23 ``prompt >= context`` or ``prompt + max_new_tokens > context``, 0.5.3 already at equal);
  counts each image's tokens as SGLang does (0.5.3: its own resize, factor 28, then the processor;
  0.5.23: the processor of the model directory alone, with ``mm_process_config["image"]`` as call
  kwargs); keeps a content-keyed vision-embedding cache like ``MultiModalStaticCache`` (neither
  ``flush_cache`` nor a weight update clears it) and counts images embedded by older weights; and
  refuses to run while memory is released or from released weights that were not sent again;
* ``update_weights_from_tensor`` answers ``(False, message)`` outside ``begin_weight_update`` /
  ``end_weight_update`` where the version requires a session (0.5.23), lets each TP rank deserialise
  its own payload only (a payload deserialised twice raises: it would break the producer's CUDA-IPC
  reference count), rebuilds the bucket as SGLang's loader does, and applies the
  ``load_weights`` name rules of SGLang's Qwen2.5-VL / Qwen3-VL when the model directory has a
  ``config.json``: unknown names are skipped silently (``skipped_weights``), as the real ones do, so
  tests must check that every sent name reached a parameter and every parameter got all its shards
  (:func:`missing_parameters`);
* ``release_memory_occupation(tags)`` / ``resume_memory_occupation(tags)`` keep SGLang's set of
  offloaded tags (None or empty means every tag of the version; resuming a tag that was not
  released raises ``KeyError`` as ``set.remove`` does there); releasing the weights turns them into
  garbage (NaN), as SGLang's memory saver frees them without a CPU copy. Stricter than SGLang in
  one place: a tag the version does not know (``cuda_graph`` on 0.5.3) is refused instead of ignored.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import pickle
import re
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


_serials = itertools.count()


class FakeSerializer:
    """Each ``serialize`` call is one CUDA-IPC registration: tagged so the fake engine can tell when
    the same one is deserialised by two ranks."""

    @staticmethod
    def serialize(obj):
        return pickle.dumps(((os.getpid(), next(_serials)), obj))


# --------------------------------------------------------------------------- SGLang's parameter names
STACKED = ((".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"), (".qkv_proj", ".v_proj", "v"),
           ("gate_up_proj", "up_proj", 1), ("gate_up_proj", "gate_proj", 0))
"""``stacked_params_mapping`` of both models' ``load_weights`` (0.5.23 ``models/qwen2_5_vl.py``,
``models/qwen3_vl.py``): (parameter, checkpoint shard, shard id)."""


def sglang_parameter_shards(hf_config) -> dict[str, set]:
    """SGLang 0.5.23's ``named_parameters()`` of the model, each with the shard ids it loads from:
    ``Qwen2_5_VLForConditionalGeneration`` (``Qwen2Model``, ``Qwen2_5_VisionTransformer``: fused
    ``qkv_proj`` / ``gate_up_proj``, ``merger.ln_q`` / ``mlp.0`` / ``mlp.2``) or
    ``Qwen3VLForConditionalGeneration`` (``Qwen3LLMModel`` with ``q_norm`` / ``k_norm``,
    ``Qwen3VLMoeVisionModel`` with ``pos_embed``, LayerNorm blocks, ``deepstack_merger_list``)."""
    text, vision = hf_config.get_text_config(), hf_config.vision_config
    one = {None}
    params: dict[str, set] = {"model.embed_tokens.weight": one, "model.norm.weight": one, "lm_head.weight": one}
    qwen3 = hf_config.model_type == "qwen3_vl"
    for i in range(text.num_hidden_layers):
        layer = f"model.layers.{i}."
        params[layer + "self_attn.qkv_proj.weight"] = {"q", "k", "v"}
        if not qwen3 or getattr(text, "attention_bias", False):
            params[layer + "self_attn.qkv_proj.bias"] = {"q", "k", "v"}
        params[layer + "mlp.gate_up_proj.weight"] = {0, 1}
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
                     "post_attention_layernorm.weight") + (("self_attn.q_norm.weight", "self_attn.k_norm.weight") if qwen3 else ()):
            params[layer + name] = one
    both = ("weight", "bias")
    if qwen3:
        params.update({f"visual.{n}.{w}": one for n in ("patch_embed.proj", "merger.norm", "merger.linear_fc1",
                                                         "merger.linear_fc2") for w in both})
        params["visual.pos_embed.weight"] = one
        for j in range(vision.depth):
            params.update({f"visual.blocks.{j}.{n}.{w}": one for n in ("norm1", "norm2", "attn.qkv_proj", "attn.proj",
                                                                        "mlp.linear_fc1", "mlp.linear_fc2") for w in both})
        for k in range(len(vision.deepstack_visual_indexes)):
            params.update({f"visual.deepstack_merger_list.{k}.{n}.{w}": one
                           for n in ("norm", "linear_fc1", "linear_fc2") for w in both})
    else:
        params["visual.patch_embed.proj.weight"] = one
        params["visual.merger.ln_q.weight"] = one
        params.update({f"visual.merger.mlp.{m}.{w}": one for m in (0, 2) for w in both})
        for j in range(vision.depth):
            block = f"visual.blocks.{j}."
            params.update({block + f"{n}.weight": one for n in ("norm1", "norm2")})
            params.update({block + f"{n}.{w}": one for n in ("attn.qkv_proj", "attn.proj", "mlp.down_proj") for w in both})
            params.update({block + f"mlp.gate_up_proj.{w}": {0, 1} for w in both})
    return params


def sglang_load_target(model_type: str, name: str, params) -> tuple[str, object] | None:
    """Where SGLang 0.5.23's ``load_weights`` puts checkpoint tensor ``name``: ``(parameter, shard)``,
    or None where it skips it without a word. Qwen2.5-VL's stacked branch indexes ``params_dict``
    directly (``KeyError`` for an unknown fused name); Qwen3-VL's skips it."""
    if "rotary_emb.inv_freq" in name:
        return None
    qwen3 = model_type == "qwen3_vl"
    if qwen3 and "language_model" in name:
        name = name.replace("model.language_model.", "model.")
    for param_name, weight_name, shard in STACKED:
        if weight_name not in name:
            continue
        if "visual" in name and (qwen3 or ("up_proj" not in name and "gate_proj" not in name)):
            continue
        name = name.replace(weight_name, param_name)
        if name.endswith(".bias") and name not in params:
            return None
        if qwen3 and name not in params:
            return None
        if name not in params:
            raise KeyError(name)
        return name, shard
    if "visual" in name:
        name = name.replace("attn.qkv.", "attn.qkv_proj.")
        if qwen3:
            name = name.replace("model.visual.", "visual.")
    return (name, None) if name in params else None


# --------------------------------------------------------------------------- the engine
class FakeEngine:
    """Mimics ``sglang.Engine`` of ``version``: records calls, keeps a weight table, echoes scripted generations."""

    version = "0.5.23"

    def __init__(self, **kwargs):
        table = SIGNATURES[self.version]
        unknown = sorted(set(kwargs) - set(table["server_args"]))
        if unknown:
            raise TypeError(f"ServerArgs.__init__() got unexpected keyword argument(s) {unknown}")
        if os.environ.get(se.AGENT_STORE_ENV) == "True":
            raise TimeoutError("the scheduler's init_process_group(tcp://...) made a client-only TCPStore "
                               f"({se.AGENT_STORE_ENV}=True) and timed out waiting for its server")
        reads_cache_env = bool(table["environment"]["reads"][se.VLM_CACHE_ENV])
        self.vision_cache_mb = int(os.environ.get(se.VLM_CACHE_ENV, "100")) if reads_cache_env else 0
        for name in table["environment"]["engine_writes"]:
            if name.startswith(("NCCL_", "CUDA_")):
                os.environ[name] = "set-by-sglang"
        self.kwargs = kwargs
        self.calls: list[tuple[str, dict]] = []
        self.weights: dict[str, torch.Tensor] = {}
        """Received tensors under the names they were sent with, those that reached a parameter."""
        self.skipped_weights: list[str] = []
        """Sent names SGLang's ``load_weights`` dropped without a word."""
        self.script: list[list[dict]] = []
        self.offload_tags: set[str] = set()
        self.lost_weights: set[str] = set()
        """Weights released and not received since (SGLang would decode from freed memory)."""
        self.image_token_counts: list[list[int]] = []
        """Per generated request with images: the image tokens SGLang computed for each image."""
        self.session_open = False
        self.weights_version = 0
        self.vision_cache: dict[str, int] = {}
        self.stale_vision_embeddings = 0
        """Images answered from the vision cache with an embedding of older weights."""
        self._consumed_payloads: set = set()
        model_dir = Path(kwargs.get("model_path", ""))
        self.hf_config = self.processor = self.tokenizer = None
        if (model_dir / "config.json").is_file():
            from transformers import AutoConfig

            self.hf_config = AutoConfig.from_pretrained(model_dir)
        if (model_dir / "preprocessor_config.json").is_file():
            from transformers import Qwen2VLImageProcessorPil  # the class of both models' processors here

            self.processor = Qwen2VLImageProcessorPil.from_pretrained(model_dir)
        if (model_dir / "tokenizer.json").is_file():
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.params = sglang_parameter_shards(self.hf_config) if self.hf_config is not None else None
        self.loaded_shards: dict[str, set] = {}
        self.context_length = kwargs.get("context_length") or (
            self.hf_config.get_text_config().max_position_embeddings if self.hf_config is not None else None)

    @property
    def memory_types(self) -> list[str]:
        return sorted(SIGNATURES[self.version]["memory_tags"].values())

    # ------------------------------------------------------------------ generation
    def _image_tokens(self, image) -> int | None:
        """What SGLang counts for one image: the version's own resize, then the directory's processor."""
        rule = SIGNATURES[self.version]["image_resize"]
        if rule is not None:
            from PIL import Image

            from care_megatron.data.image_inputs import smart_resize

            height, width = smart_resize(image.height, image.width, rule["factor"], rule["min_pixels"], rule["max_pixels"])
            image = image.resize((width, height), Image.BICUBIC)
        if self.processor is None:
            return None
        image_kwargs = (self.kwargs.get("mm_process_config") or {}).get("image", {})
        grid = self.processor(images=[image], return_tensors="pt", **image_kwargs)["image_grid_thw"][0]
        return int(grid.prod()) // self.processor.merge_size ** 2

    def _check_length(self, input_len: int, params: dict) -> None:
        if self.context_length is None:
            return
        new = params.get("max_new_tokens")
        over = input_len + new > self.context_length if Version(self.version) >= Version("0.5.23") else \
            input_len + new >= self.context_length
        if input_len >= self.context_length or (new is not None and over):
            raise ValueError(f"Requested token count exceeds the model's maximum context length of {self.context_length} "
                             f"tokens ({input_len} input + {new} new)")

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
        requests = input_ids if input_ids is not None else prompt
        per_request = sampling_params if isinstance(sampling_params, list) else [sampling_params or {}] * len(requests)
        pad = self.tokenizer.convert_tokens_to_ids("<|image_pad|>") if self.tokenizer is not None else None
        for i, request in enumerate(requests):
            images = image_data[i] if image_data is not None else []
            counts = [self._image_tokens(im) for im in images]
            if images:
                self.image_token_counts.append(counts)
                self._embed(images)
            if input_ids is not None:
                self._check_length(len(request), per_request[i])
            elif self.tokenizer is not None and None not in counts:
                ids = self.tokenizer(re.sub(r"(<\|image_pad\|>)+", "<|image_pad|>", request))["input_ids"]
                self._check_length(len(ids) + sum(counts) - sum(t == pad for t in ids), per_request[i])
        return self.script.pop(0)

    def _embed(self, images) -> None:
        """The vision tower's pass, through the content-keyed cache when it has room."""
        for image in images:
            key = hashlib.sha256(image.tobytes() + repr(image.size).encode()).hexdigest()
            if self.vision_cache_mb > 0 and key in self.vision_cache:
                self.stale_vision_embeddings += self.vision_cache[key] != self.weights_version
            elif self.vision_cache_mb > 0:
                self.vision_cache[key] = self.weights_version

    # ------------------------------------------------------------------ weights
    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        self.calls.append(("update_weights_from_tensor", dict(n=len(named_tensors), load_format=load_format,
                                                              flush_cache=flush_cache)))
        if SIGNATURES[self.version]["weight_update_session_required"] and not self.session_open:
            return False, "update_weights_from_tensor must run between begin_weight_update() and end_weight_update()"
        if "weights" in self.offload_tags:
            raise RuntimeError("update_weights_from_tensor while the weights are released: SGLang would fault")
        assert load_format == "flattened_bucket"
        self.received_by_rank = []
        for payload in named_tensors:  # each TP rank deserialises its own payload
            serial, bucket = pickle.loads(payload)
            if serial in self._consumed_payloads:
                raise RuntimeError("a payload was deserialised by a second TP rank: the producer's CUDA-IPC "
                                   "reference count would be released twice (send one serialisation per rank)")
            self._consumed_payloads.add(serial)
            self.received_by_rank.append(bucket)
        for name, tensor in se.unflatten_bucket(self.received_by_rank[0]["flattened_tensor"],
                                                self.received_by_rank[0]["metadata"]):
            self._load(name, tensor)
        # the fake cannot tell a full sync from a partial one of weights it never saw: any update
        # replaces the start-up weights
        self.lost_weights.discard(STARTUP_WEIGHTS)
        self.weights_version += 1
        return True, "Succeeded"

    def _load(self, name: str, tensor: torch.Tensor) -> None:
        if self.params is not None:
            target = sglang_load_target(self.hf_config.model_type, name, self.params)
            if target is None:
                self.skipped_weights.append(name)
                return
            self.loaded_shards.setdefault(target[0], set()).add(target[1])
            if target[0] == "model.embed_tokens.weight" and self.hf_config.tie_word_embeddings:
                self.loaded_shards.setdefault("lm_head.weight", set()).add(None)
        self.weights[name] = tensor.clone()
        self.lost_weights.discard(name)

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


class WeightUpdateSession:
    """``Engine.begin_weight_update`` / ``end_weight_update`` of 0.5.23 (scheduler_components/weight_updater.py)."""

    def begin_weight_update(self, selector="all"):
        self.calls.append(("begin_weight_update", {}))
        if self.session_open:
            return False, "a weight-update session is already open; call end_weight_update() first"
        self.session_open = True
        return True, "Success"

    def end_weight_update(self):
        self.calls.append(("end_weight_update", {}))
        if not self.session_open:
            return False, "no weight-update session is open; call begin_weight_update() first"
        self.session_open = False
        return True, "Success"


def missing_parameters(engine: FakeEngine) -> set[str]:
    """SGLang parameters of ``engine`` that did not receive every shard since start-up."""
    return {name for name, shards in engine.params.items() if engine.loaded_shards.get(name, set()) != shards}


FAKED_VERSIONS = sorted(SIGNATURES, key=Version)
"""The SGLang versions the table (and so the fake) covers, oldest first."""


def fake_engine_class(version: str) -> type:
    """``FakeEngine`` of a tabled ``version``, with the session methods where that version has them."""
    session = "begin_weight_update" in SIGNATURES[version]["engine_methods"]
    bases = (WeightUpdateSession, FakeEngine) if session else (FakeEngine,)
    return type(f"FakeEngine_{version.replace('.', '_')}", bases, {"version": version})


def fake_api(version: str = FAKED_VERSIONS[-1]) -> se.SGLangAPI:
    """The SGLang API surface of ``version``; a version outside the table (the version-check tests
    ask for unsupported ones) behaves like the newest tabled one but reports its own number."""
    table = version if version in SIGNATURES else FAKED_VERSIONS[-1]
    engine_cls = fake_engine_class(table)
    rule = SIGNATURES[table]["image_resize"]
    return se.SGLangAPI(version=version, Engine=engine_cls, MultiprocessingSerializer=FakeSerializer,
                        FlattenedTensorMetadata=FakeMetadata,
                        cuda_graph_memory_tag="GPU_MEMORY_TYPE_CUDA_GRAPH" in SIGNATURES[table]["memory_tags"],
                        weight_update_session=hasattr(engine_cls, "begin_weight_update"),
                        server_args=frozenset(SIGNATURES[table]["server_args"]),
                        own_image_resize=None if rule is None else (rule["factor"], rule["min_pixels"], rule["max_pixels"]))
