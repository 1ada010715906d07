"""Rollouts on SGLang's offline engine, colocated on the training GPUs. The only module importing ``sglang``.

Targets the SGLang Python API ``SUPPORTED_SGLANG`` (checked at start-up, with a clear error on a
mismatch). The calls used, all on ``sglang.Engine``:

* ``Engine(model_path=..., tp_size=..., base_gpu_id=..., mem_fraction_static=...,
  enable_memory_saver=True, random_seed=..., dtype=..., nccl_port=...)``: started from the run's
  Hugging-Face-format model directory (the weights there are only the starting point; every step
  overwrites them). ``nccl_port`` is the rendezvous port of the engine's own TP processes; left
  unset, SGLang 0.5.3 draws it from ``random`` (``port + randint(100, 1000)``), which every trainer
  rank seeds alike, so the engines of one node would collide: :func:`pick_nccl_port` gives each
  engine slot of a node its own range;
* ``generate(prompt=... | input_ids=..., image_data=..., sampling_params=..., return_logprob=True,
  logprob_start_len=-1)``: images go already resized to the trainer's size (``image_grid_thw`` times
  the patch size; see :func:`trainer_sized_image`). 0.5.3 resizes them itself with fixed bounds before
  the processor; 0.5.23 leaves the size to the Hugging Face processor it loads from the model
  directory (``multimodal/processors/qwen_vl.py``), to which the engine passes the trainer's bounds
  (``mm_process_config``). Either way the resizing is the identity and its image token counts equal
  the trainer's (:func:`check_image_geometry`). A request longer than the context fails the whole
  call in SGLang (``TokenizerManager._validate_one_request``), so lengths are checked before sending
  (:meth:`SGLangRolloutEngine.fit_to_context`). One dict per request with ``output_ids`` / ``text`` and ``meta_info``
  holding ``output_token_logprobs`` = ``[(logprob, token_id, text|None), ...]`` and ``finish_reason``
  = ``{"type": "stop" | "length" | "abort", ...}``;
* ``begin_weight_update()`` / ``end_weight_update()`` (0.5.23; absent from 0.5.3) around the buckets
  of one sync: 0.5.23's scheduler answers ``update_weights_from_tensor`` with success=False outside
  such a session (``managers/scheduler_components/weight_updater.py``);
* ``update_weights_from_tensor(named_tensors, load_format="flattened_bucket", flush_cache=False)``:
  colocated weight sync. Each bucket is one flat tensor plus ``FlattenedTensorMetadata`` entries,
  serialised with ``MultiprocessingSerializer`` (CUDA tensors travel as CUDA-IPC handles: no copy
  through host memory), one payload per rollout-TP rank, each serialised separately (SGLang rank i
  deserialises only entry i, ``TpModelWorker.deserialize_own_rank``; one payload deserialised by
  several ranks breaks the producer's CUDA-IPC reference counting);
* ``flush_cache()`` once after the last bucket (the radix cache holds KV of the old weights);
* ``release_memory_occupation(tags)`` / ``resume_memory_occupation(tags)`` for sleep / wake, always
  with explicit tags: ``"weights"``, ``"kv_cache"`` and, where SGLang has it (``GPU_MEMORY_TYPE_CUDA_GRAPH``
  in ``sglang.srt.constants``, absent from 0.5.3), ``"cuda_graph"`` together with the KV cache. A
  tag must be resumed only after it was released (SGLang keeps them in a set and ``remove``s them).
  Released weights are freed without a CPU copy (``enable_weights_cpu_backup`` defaults to False),
  so after waking the weights the engine refuses to generate until ``update_weights`` has run;
* ``shutdown()``.

Only the colocated weight sync exists: an NCCL broadcast path (``init_weights_update_group`` /
``update_weights_from_distributed``) is needed only when the engines sit on other GPUs than the
trainer, a layout the launcher does not build.

Behaviour log-probs: SGLang reports ``log_softmax(logits / T)`` of the sampled token (after
temperature, before top-k / top-p) unless ``SGLANG_RETURN_ORIGINAL_LOGPROB`` (0.5.23; early 0.5.x
read ``RETURN_ORIGINAL_LOGPROB``) is set, and treats
``T == 0`` as greedy at ``T = 1``: the same convention as ``HFRolloutEngine`` and
``mismatch.logprob_temperature``. :func:`check_logprob_convention` refuses to start when that
environment variable would change the meaning.

Start-up environment (:func:`engine_start_environment`): SGLang's scheduler processes inherit this
process's environment. torchrun's ``TORCHELASTIC_USE_AGENT_STORE=True`` would turn their
``init_process_group("tcp://...")`` into a TCPStore client with no server (torch
``distributed/rendezvous.py``, ``_create_c10d_store``), so it is removed while the engine starts;
``SGLANG_VLM_CACHE_SIZE_MB=0`` turns off the vision-embedding cache (``MultiModalStaticCache``, keyed
by image content and cleared by neither ``flush_cache`` nor a weight update: a repeated image would
be embedded by old vision weights); and the NCCL / CUDA variables ``Engine`` rewrites in this process
(``_set_envs_and_config``) are restored afterwards, so the trainer's communicators see the same
values on every rank.

GPU placement rule (``rollout_placement``): the launcher's local ranks on a node are cut into
consecutive groups of ``rollout_tp`` ranks; group ``g`` runs one engine on GPUs
``g * rollout_tp ... g * rollout_tp + rollout_tp - 1``, so ``base_gpu_id = g * rollout_tp`` (an
index into the GPUs the launcher process sees). Only the first rank of a group starts and drives
the engine; an engine never spans nodes, so ``rollout_tp`` must divide the GPUs per node.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, MutableMapping, Sequence

import torch

from care_megatron.rollout.base import (MEMORY_TAGS, Completion, GenerationRequest, SamplingParams,  # noqa: F401
                                        bucket_named_tensors, memory_tags)  # (bucketing re-exported)

logger = logging.getLogger(__name__)

SUPPORTED_SGLANG = ">=0.5.3,<0.6"
"""SGLang versions whose ``Engine`` API this adapter is written against."""

_MIN_VERSION, _MAX_VERSION_EXCLUSIVE = "0.5.3", "0.6"

INSTALL_HINT = "pip install 'care_megatron[sglang]'"


# --------------------------------------------------------------------------- the import point
@dataclass
class SGLangAPI:
    """The parts of SGLang this adapter touches; built by :func:`load_sglang_api` (tests pass a fake)."""

    version: str
    """``sglang.__version__``."""
    Engine: Callable[..., Any]
    """``sglang.Engine``: the offline engine class."""
    MultiprocessingSerializer: Any
    """``sglang.srt.utils.MultiprocessingSerializer`` (``serialize(obj) -> bytes``)."""
    FlattenedTensorMetadata: Callable[..., Any]
    """``sglang.srt.weight_sync.tensor_bucket.FlattenedTensorMetadata`` (name, shape, dtype,
    start_idx, end_idx, numel)."""
    cuda_graph_memory_tag: bool = False
    """True when SGLang releases CUDA-graph memory under its own ``"cuda_graph"`` tag (after 0.5.3;
    ``sglang.srt.constants.GPU_MEMORY_TYPE_CUDA_GRAPH``); it is then released and resumed with the KV cache."""
    weight_update_session: bool = False
    """True when ``Engine`` has ``begin_weight_update`` / ``end_weight_update`` (0.5.23), whose scheduler
    refuses ``update_weights_from_tensor`` outside such a session."""
    server_args: frozenset[str] = frozenset()
    """The ``ServerArgs`` field names ``Engine(**kwargs)`` accepts (``mm_process_config`` from 0.5.23 on)."""
    own_image_resize: tuple[int, int, int] | None = None
    """``(factor, min_pixels, max_pixels)`` when SGLang resizes Qwen-VL images itself before its
    processor (0.5.3: ``multimodal/processors/qwen_vl.py`` ``resize_image`` with ``IMAGE_FACTOR``,
    ``MIN_PIXELS``, ``MAX_PIXELS``); None when the processor alone decides (0.5.23)."""


def load_sglang_api() -> SGLangAPI:
    """Import SGLang (the one place this package does), check its version, return its API surface."""
    try:
        import sglang
        from sglang.srt import constants as sglang_constants
        from sglang.srt.multimodal.processors import qwen_vl
        from sglang.srt.server_args import ServerArgs
        from sglang.srt.utils import MultiprocessingSerializer
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata
    except ImportError as exc:
        raise ImportError(
            f"rollout.engine=sglang needs SGLang {SUPPORTED_SGLANG} and a CUDA GPU: {INSTALL_HINT} "
            f"(import failed: {exc})"
        ) from exc
    api = SGLangAPI(
        version=getattr(sglang, "__version__", "unknown"),
        Engine=sglang.Engine,
        MultiprocessingSerializer=MultiprocessingSerializer,
        FlattenedTensorMetadata=FlattenedTensorMetadata,
        cuda_graph_memory_tag=hasattr(sglang_constants, "GPU_MEMORY_TYPE_CUDA_GRAPH"),
        weight_update_session=hasattr(sglang.Engine, "begin_weight_update"),
        server_args=server_arg_names(ServerArgs),
        own_image_resize=((qwen_vl.IMAGE_FACTOR, qwen_vl.MIN_PIXELS, qwen_vl.MAX_PIXELS)
                          if hasattr(qwen_vl, "resize_image") else None),
    )
    check_sglang_version(api.version)
    return api


def server_arg_names(server_args_class: Any) -> frozenset[str]:
    """Field names of SGLang's ``ServerArgs``: a dataclass up to 0.5.x, a ``msgspec.Struct`` (its
    ``__struct_fields__``) in 0.5.23."""
    import dataclasses

    fields = getattr(server_args_class, "__struct_fields__", None)
    if fields is None:
        fields = [f.name for f in dataclasses.fields(server_args_class)]
    return frozenset(fields)


def check_sglang_version(version: str) -> None:
    """Raise ``RuntimeError`` unless ``version`` is in ``SUPPORTED_SGLANG``."""
    from packaging.version import InvalidVersion, Version

    try:
        found = Version(version)
    except InvalidVersion as exc:
        raise RuntimeError(f"cannot parse the SGLang version {version!r}; this adapter targets sglang{SUPPORTED_SGLANG}") from exc
    if not (Version(_MIN_VERSION) <= found < Version(_MAX_VERSION_EXCLUSIVE)):
        raise RuntimeError(
            f"SGLang {version} is installed, but care_megatron's SGLang adapter targets sglang{SUPPORTED_SGLANG} "
            f"(Engine.update_weights_from_tensor / flattened_bucket / release_memory_occupation API); "
            f"install a supported version: {INSTALL_HINT}"
        )


ORIGINAL_LOGPROB_ENV_VARS = ("SGLANG_RETURN_ORIGINAL_LOGPROB", "RETURN_ORIGINAL_LOGPROB")
"""The switch to pre-temperature log-probs: ``SGLANG_RETURN_ORIGINAL_LOGPROB`` in 0.5.23,
``RETURN_ORIGINAL_LOGPROB`` in early 0.5.x (0.5.3 ``layers/sampler.py``)."""


def check_logprob_convention(environ: dict | None = None) -> None:
    """Refuse the original-logprob switch under either name: it makes SGLang report pre-temperature
    log-probs, which would no longer match what the trainer recomputes (``mismatch.logprob_temperature``)."""
    environ = os.environ if environ is None else environ
    for name in ORIGINAL_LOGPROB_ENV_VARS:
        if str(environ.get(name, "")).strip().lower() in ("1", "true", "yes", "on"):
            raise RuntimeError(
                f"{name} is set: SGLang would report log-probs before temperature scaling, "
                "but the trainer compares against log_softmax(logits / T); unset it"
            )


# --------------------------------------------------------------------------- placement
@dataclass(frozen=True)
class RolloutPlacement:
    """Where this launcher rank sits among the node's rollout engines."""

    engine_index: int
    """Index of the engine on this node (local_rank // rollout_tp)."""
    base_gpu_id: int
    """First GPU of that engine: engine_index * rollout_tp."""
    tp_rank: int
    """This rank's position inside the engine's TP group (local_rank % rollout_tp)."""
    is_engine_owner: bool
    """True for the rank that starts and drives the engine (tp_rank == 0)."""
    group_local_ranks: tuple[int, ...]
    """Local ranks sharing the engine (their GPUs are the engine's GPUs)."""


def rollout_placement(local_rank: int, local_world_size: int, rollout_tp: int) -> RolloutPlacement:
    """The module docstring's placement rule; ``ValueError`` when the sizes do not tile a node."""
    if rollout_tp < 1:
        raise ValueError(f"rollout tensor_parallel_size must be >= 1, got {rollout_tp}")
    if local_world_size % rollout_tp:
        raise ValueError(
            f"rollout tensor_parallel_size {rollout_tp} must divide the GPUs per node ({local_world_size}): "
            "an SGLang engine cannot span nodes"
        )
    if not 0 <= local_rank < local_world_size:
        raise ValueError(f"local_rank {local_rank} outside [0, {local_world_size})")
    engine_index = local_rank // rollout_tp
    base = engine_index * rollout_tp
    return RolloutPlacement(
        engine_index=engine_index,
        base_gpu_id=base,
        tp_rank=local_rank % rollout_tp,
        is_engine_owner=local_rank % rollout_tp == 0,
        group_local_ranks=tuple(range(base, base + rollout_tp)),
    )


NCCL_PORT_BASE = 21000
"""First port of the engines' NCCL rendezvous ranges: below Linux's ephemeral range (32768+) and
clear of torchrun's default 29500 at the default span and eight engines per node."""
NCCL_PORT_SPAN = 100
"""Ports per engine slot of a node: slot i tries ``NCCL_PORT_BASE + i * NCCL_PORT_SPAN`` upward."""


def port_is_free(port: int, host: str = "") -> bool:
    """True if a TCP socket can bind ``port`` on ``host`` now (what SGLang's rendezvous will do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def pick_nccl_port(engine_index: int, *, base: int = NCCL_PORT_BASE, span: int = NCCL_PORT_SPAN,
                   is_free: Callable[[int], bool] = port_is_free) -> int:
    """The first free port of engine slot ``engine_index``'s own range on this node.

    The ranges of a node's slots do not overlap, so engines started at the same moment by different
    ranks cannot pick the same port, whatever their ``random`` state; ports taken by anything else
    (another job) are skipped. ``RuntimeError`` when the whole range is taken.
    """
    if engine_index < 0:
        raise ValueError(f"engine_index must be >= 0, got {engine_index}")
    start = base + engine_index * span
    if start + span > 65536:
        raise ValueError(f"NCCL port range of engine {engine_index} ({start}..{start + span - 1}) exceeds 65535")
    for port in range(start, start + span):
        if is_free(port):
            return port
    raise RuntimeError(f"no free port for SGLang engine {engine_index}'s NCCL rendezvous in {start}..{start + span - 1}")


# --------------------------------------------------------------------------- config
@dataclass
class SGLangEngineConfig:
    """How one SGLang engine is started and fed."""

    model_path: str
    """Hugging-Face-format model directory (config, tokenizer, processor, weights) the engine starts from."""
    tp_size: int = 1
    """Rollout tensor-parallel size (``RolloutConfig.tensor_parallel_size``)."""
    base_gpu_id: int = 0
    """First GPU of this engine; see ``rollout_placement``."""
    mem_fraction_static: float = 0.5
    """Share of GPU memory SGLang reserves for weights + KV cache; colocated with training, so well below 1."""
    enable_memory_saver: bool = True
    """Needed for ``release_memory_occupation`` (sleep) to actually free weights and KV cache."""
    dtype: str = "bfloat16"
    """Weights / compute dtype of the engine."""
    random_seed: int = 0
    """Engine-wide sampling seed (SGLang's ``random_seed``)."""
    nccl_port: int | None = None
    """Port of the engine's TP rendezvous (SGLang ``nccl_port``); None leaves SGLang's own choice,
    which collides between engines of one node (see :func:`pick_nccl_port`, which the builder uses)."""
    image_patch_size: int = 14
    """Vision patch size of the policy (``vision_config.patch_size``): images are sent at
    ``image_grid_thw * image_patch_size`` pixels, the size the trainer's processor resized them to."""
    image_merge_size: int = 2
    """Spatial merge size of the policy (``vision_config.spatial_merge_size``): image sides are
    multiples of ``image_patch_size * image_merge_size`` (28 for Qwen2.5-VL, 32 for Qwen3-VL)."""
    image_min_pixels: int | None = None
    """The trainer's ``data.min_pixels``: passed to SGLang's processor where it takes resize bounds
    (``mm_process_config``), else checked against the bounds SGLang will use (:func:`check_image_geometry`)."""
    image_max_pixels: int | None = None
    """The trainer's ``data.max_pixels`` (ditto)."""
    context_length: int | None = None
    """Tokens of prompt + response the engine accepts (SGLang ``context_length``), passed explicitly so
    that SGLang's length check and the adapter's agree; None reads the model directory's
    ``max_position_embeddings``, the value SGLang derives itself for the Qwen-VL models."""
    forward_sampling_seed: bool = False
    """Forward ``SamplingParams.seed`` as SGLang's per-request ``sampling_seed`` (request i of a
    call gets ``seed + i``, so the G copies of one prompt still differ). Off by default: not every
    supported SGLang version has the field, and bit-reproducible sampling there also needs
    ``engine_kwargs={"enable_deterministic_inference": True}``."""
    weight_bucket_mb: int = 512
    """Bucket size for ``update_weights`` when given a flat stream, MiB (``RolloutConfig.weight_bucket_mb``)."""
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """Further ``sglang.Engine`` keyword arguments, passed through unchanged (they win over the above)."""

    def __post_init__(self) -> None:
        if not self.model_path:
            raise ValueError("SGLangEngineConfig.model_path must name the HF-format model directory")
        if self.tp_size < 1:
            raise ValueError(f"SGLangEngineConfig.tp_size must be >= 1, got {self.tp_size}")
        if self.base_gpu_id < 0:
            raise ValueError(f"SGLangEngineConfig.base_gpu_id must be >= 0, got {self.base_gpu_id}")
        if not 0 < self.mem_fraction_static < 1:
            raise ValueError(f"SGLangEngineConfig.mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}")
        if self.weight_bucket_mb < 1:
            raise ValueError(f"SGLangEngineConfig.weight_bucket_mb must be >= 1, got {self.weight_bucket_mb}")
        if self.nccl_port is not None and not 0 < self.nccl_port < 65536:
            raise ValueError(f"SGLangEngineConfig.nccl_port must be a TCP port, got {self.nccl_port}")
        if self.image_patch_size < 1 or self.image_merge_size < 1:
            raise ValueError(f"SGLangEngineConfig.image_patch_size / image_merge_size must be >= 1, got "
                             f"{self.image_patch_size} / {self.image_merge_size}")
        if self.context_length is not None and self.context_length < 2:
            raise ValueError(f"SGLangEngineConfig.context_length must be >= 2, got {self.context_length}")

    @property
    def image_factor(self) -> int:
        """Side multiple of the trainer's resized images (patch size times merge size)."""
        return self.image_patch_size * self.image_merge_size

    def engine_args(self, api: SGLangAPI | None = None) -> dict[str, Any]:
        """``sglang.Engine`` keyword arguments; with ``api``, also what that version accepts beyond
        0.5.3's (the trainer's image resize bounds as ``mm_process_config``)."""
        args = dict(
            model_path=self.model_path,
            tp_size=self.tp_size,
            base_gpu_id=self.base_gpu_id,
            mem_fraction_static=self.mem_fraction_static,
            enable_memory_saver=self.enable_memory_saver,
            dtype=self.dtype,
            random_seed=self.random_seed,
        )
        if self.nccl_port is not None:
            args["nccl_port"] = self.nccl_port
        if self.context_length is not None:
            args["context_length"] = self.context_length
        if api is not None and passes_image_bounds(api, self):
            # images_kwargs of the processor call (base_processor.process_mm_data) and kwargs of the
            # image processor (qwen_vl.prepare_artifact_batch); transformers' Qwen2VLImageProcessor
            # reads the bounds from ``size`` (its min_pixels / max_pixels kwargs are deprecated).
            args["mm_process_config"] = {"image": {"size": {"shortest_edge": self.image_min_pixels,
                                                            "longest_edge": self.image_max_pixels}}}
        args.update(self.engine_kwargs)
        return args


def passes_image_bounds(api: SGLangAPI, config: SGLangEngineConfig) -> bool:
    """Whether the engine hands the trainer's resize bounds to SGLang's processor (``mm_process_config``,
    0.5.23) instead of relying on the bounds of the processor saved in the model directory."""
    return ("mm_process_config" in api.server_args and "mm_process_config" not in config.engine_kwargs
            and config.image_min_pixels is not None and config.image_max_pixels is not None)


def check_image_geometry(api: SGLangAPI, config: SGLangEngineConfig) -> None:
    """Refuse to start when SGLang would resize the trainer-sized images (:func:`trainer_sized_image`)
    and so count other image tokens than the trainer: ``ValueError`` naming the config field.

    Two resizes can change them. 0.5.3 first applies its own rule (``api.own_image_resize``: sides
    rounded to multiples of 28, area clamped to fixed bounds); every SGLang version then runs the
    processor of the model directory, whose bounds are the trainer's where they are passed through
    (:func:`passes_image_bounds`) and those of ``preprocessor_config.json`` otherwise (a real Qwen3-VL
    directory: at least 65,536 pixels).
    """
    low, high = config.image_min_pixels, config.image_max_pixels
    if api.own_image_resize is not None:
        factor, own_low, own_high = api.own_image_resize
        if config.image_factor % factor:
            raise ValueError(f"config field 'model.arch': SGLang {api.version} resizes images to multiples of {factor} "
                             f"pixels itself, but this model's images are multiples of {config.image_factor} "
                             "(patch size x merge size); its image tokens would differ from the trainer's")
        _check_bounds_within(low, high, own_low, own_high, f"SGLang {api.version}'s own resize bounds")
    if not passes_image_bounds(api, config):
        from care_megatron.models.registry import _saved_preprocessor_settings

        saved = _saved_preprocessor_settings(config.model_path) if os.path.isdir(config.model_path) else {}
        _check_bounds_within(low, high, saved.get("min_pixels"), saved.get("max_pixels"),
                             f"the processor SGLang loads from {config.model_path}/preprocessor_config.json")


def _check_bounds_within(low: int | None, high: int | None, sglang_low: int | None, sglang_high: int | None,
                         whose: str) -> None:
    if low is not None and sglang_low is not None and low < sglang_low:
        raise ValueError(f"config field 'data.min_pixels' is {low}, below the minimum {sglang_low} of {whose}: "
                         "SGLang would enlarge smaller images and count more image tokens than the trainer; "
                         f"raise data.min_pixels to {sglang_low}")
    if high is not None and sglang_high is not None and high > sglang_high:
        raise ValueError(f"config field 'data.max_pixels' is {high}, above the maximum {sglang_high} of {whose}: "
                         f"SGLang would shrink larger images; lower data.max_pixels to {sglang_high}")


# --------------------------------------------------------------------------- start-up environment
AGENT_STORE_ENV = "TORCHELASTIC_USE_AGENT_STORE"
"""Set to ``True`` by torchrun in every worker; inherited by SGLang's schedulers it makes their tcp://
rendezvous a client-only TCPStore (torch ``distributed/rendezvous.py``), which waits for a server forever."""
VLM_CACHE_ENV = "SGLANG_VLM_CACHE_SIZE_MB"
"""Size of SGLang's vision-embedding cache (default 100; 0.5.23 ``environ.py``, 0.5.3 ``scheduler.py``)."""
ENGINE_REWRITTEN_ENV = ("NCCL_CUMEM_ENABLE", "NCCL_NVLS_ENABLE", "NCCL_GRAPH_MIXING_SUPPORT", "NCCL_MNNVL_ENABLE",
                        "CUDA_DEVICE_MAX_CONNECTIONS", "CUDA_MODULE_LOADING")
"""NCCL / CUDA variables ``Engine.__init__`` writes into this process (``entrypoints/engine.py``
``_set_envs_and_config``); set on the owner rank only, they would make its later NCCL communicators
differ from the other ranks'."""


@contextlib.contextmanager
def engine_start_environment(environ: MutableMapping[str, str] | None = None) -> Iterator[None]:
    """The environment SGLang's processes must start with (see the module docstring), restored after."""
    environ = os.environ if environ is None else environ
    names = (AGENT_STORE_ENV, VLM_CACHE_ENV, *ENGINE_REWRITTEN_ENV)
    saved = {name: environ.get(name) for name in names}
    if saved[VLM_CACHE_ENV] not in (None, "0"):
        logger.warning("%s=%s ignored: a training engine must not reuse vision embeddings of older weights",
                       VLM_CACHE_ENV, saved[VLM_CACHE_ENV])
    environ.pop(AGENT_STORE_ENV, None)
    environ[VLM_CACHE_ENV] = "0"
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                environ.pop(name, None)
            else:
                environ[name] = value


# --------------------------------------------------------------------------- pure helpers


def trainer_sized_image(image: Any, grid_thw: Sequence[int], patch_size: int) -> Any:
    """``image`` resized to the size the trainer's processor gave it: ``grid_h * patch_size`` by
    ``grid_w * patch_size`` pixels (bicubic, as the Qwen-VL processors resample).

    A multiple of the merge factor times the patch size, inside the trainer's pixel bounds, so
    SGLang's smart resize leaves it as it is and its processor cuts the same patch grid: the engine
    computes exactly the trainer's ``<|image_pad|>`` count for it.
    """
    from PIL import Image

    _, grid_h, grid_w = (int(v) for v in grid_thw)
    size = (grid_w * patch_size, grid_h * patch_size)  # PIL sizes are (width, height)
    if image.size == size:
        return image
    return image.resize(size, Image.BICUBIC)

def sglang_sampling_params(sampling: SamplingParams, stop_token_ids: Iterable[int] = ()) -> dict[str, Any]:
    """SGLang ``sampling_params`` for one request. ``T == 0`` is passed through: SGLang decodes it
    greedily (top-k 1 at T = 1), matching ``logprob_temperature``."""
    return {
        "temperature": float(sampling.temperature),
        "top_p": float(sampling.top_p),
        "top_k": int(sampling.top_k) if sampling.top_k > 0 else -1,
        "max_new_tokens": int(sampling.max_new_tokens),
        "stop_token_ids": sorted(set(stop_token_ids) | set(sampling.stop_token_ids)),
        # Keep <think> / <answer> and friends in the text: the verifier reads the tags.
        "skip_special_tokens": False,
    }


def flatten_bucket(bucket: list[tuple[str, torch.Tensor]], metadata_cls: Callable[..., Any],
                   out: torch.Tensor | None = None):
    """One flat tensor + per-tensor metadata (SGLang's ``flattened_bucket`` layout: tensor i occupies
    ``flat[start_idx:end_idx]``, reshaped to ``shape``).

    Returns ``(flat, metadata)``: flat Tensor[sum numel] of the bucket's dtype on its device.
    ``out``: a 1-D buffer of that dtype and device with room for the bucket, reused instead of a fresh
    allocation (``flat`` is then its leading slice); the caller must not reuse it while a receiver
    may still read the previous bucket.
    """
    if not bucket:
        raise ValueError("flatten_bucket: empty bucket")
    dtype, device = bucket[0][1].dtype, bucket[0][1].device
    metadata, start = [], 0
    for name, tensor in bucket:
        if tensor.dtype != dtype or tensor.device != device:
            raise ValueError(f"flatten_bucket: {name!r} is {tensor.dtype} on {tensor.device}, bucket is {dtype} on {device}")
        numel = tensor.numel()
        metadata.append(metadata_cls(name=name, shape=tensor.shape, dtype=dtype, start_idx=start,
                                     end_idx=start + numel, numel=numel))
        start += numel
    # One write per tensor straight from the exporter's (possibly strided) views: reshape(-1) of a
    # non-contiguous view followed by torch.cat would copy those bytes twice.
    if out is None:
        flat = torch.empty(start, dtype=dtype, device=device)
    else:
        if out.dim() != 1 or out.dtype != dtype or out.device != device or out.numel() < start:
            raise ValueError(f"flatten_bucket: out is {tuple(out.shape)} {out.dtype} on {out.device}; the bucket needs "
                             f"({start},) {dtype} on {device}")
        flat = out[:start]
    for m, (_, tensor) in zip(metadata, bucket):
        flat[m.start_idx:m.end_idx].view(tensor.shape).copy_(tensor)
    return flat, metadata


def unflatten_bucket(flat: torch.Tensor, metadata: list[Any]) -> list[tuple[str, torch.Tensor]]:
    """Inverse of :func:`flatten_bucket` (what SGLang does on receipt); used by tests and benchmarks."""
    return [(m.name, flat[m.start_idx:m.end_idx].reshape(m.shape)) for m in metadata]


def completion_from_sglang_output(request_id: str, output: dict, stop_token_ids: set[int]) -> Completion:
    """Turn one SGLang ``generate`` result into a ``Completion``.

    Token ids are taken from ``meta_info["output_token_logprobs"]`` (each entry pairs a log-prob with
    its token), cross-checked against ``output_ids`` when present. ``finish_reason`` "stop" /
    "length" map over; "abort" (e.g. a multimodal prompt that SGLang's scheduler finds over its
    ``max_req_input_len`` once the images are expanded) becomes "length" with a warning, so one bad
    prompt does not stop the run (prompts over the context never reach SGLang: ``fit_to_context``).
    """
    meta = output.get("meta_info") or {}
    entries = meta.get("output_token_logprobs")
    if entries is None:
        raise ValueError(f"request {request_id!r}: SGLang output has no meta_info.output_token_logprobs (was return_logprob set?)")
    token_ids = [int(e[1]) for e in entries]
    logprobs = [float(e[0]) if e[0] is not None else float("nan") for e in entries]
    output_ids = output.get("output_ids")
    if output_ids is not None and list(output_ids) != token_ids:
        trimmed_stop = len(token_ids) == len(output_ids) + 1 and token_ids[:-1] == list(output_ids) and token_ids[-1] in stop_token_ids
        if not trimmed_stop:
            raise ValueError(
                f"request {request_id!r}: output_ids ({len(output_ids)} tokens) disagree with output_token_logprobs ({len(token_ids)})"
            )
    reason = meta.get("finish_reason")
    kind = reason.get("type") if isinstance(reason, dict) else reason
    if kind == "stop":
        finish = "stop"
    elif kind == "length":
        finish = "length"
    else:
        logger.warning("SGLang request %s finished with %r; recorded as 'length'", request_id, reason)
        finish = "length"
    return Completion(request_id=request_id, token_ids=token_ids, text=output.get("text", ""),
                      logprobs=logprobs, finish_reason=finish)


def serialize_bucket(api: SGLangAPI, bucket: list[tuple[str, torch.Tensor]], ranks: int = 1) -> list[Any]:
    """``MultiprocessingSerializer.serialize({"flattened_tensor", "metadata"})`` of one bucket, once per
    receiving TP rank (``ranks``): the payloads ``update_weights_from_tensor(load_format="flattened_bucket")``
    takes. The bucket is flattened once; each rank gets its own serialisation of it, because each
    CUDA-IPC serialisation is released by the one rank that deserialises it."""
    flat, metadata = flatten_bucket(bucket, api.FlattenedTensorMetadata)
    return [api.MultiprocessingSerializer.serialize({"flattened_tensor": flat, "metadata": metadata})
            for _ in range(ranks)]


def update_weights_colocated_group(
    engine: "SGLangRolloutEngine | None",
    buckets: Iterable[list[tuple[str, torch.Tensor]]],
    *,
    api: SGLangAPI,
    tp_rank: int,
    tp_size: int,
    owner_rank: int,
    group: Any = None,
) -> int:
    """Colocated weight sync driven by every rank of one rollout-TP group (collective).

    Each rank holds the same full HF-named buckets on its own GPU (the exporter's all-gathers leave
    them there), serialises its copy (a CUDA-IPC handle to its own memory), and the payloads are
    gathered to the group's owner (``rollout_placement(...).is_engine_owner``), which hands SGLang
    the list in TP-rank order: SGLang rank i then reads GPU i's copy, locally, instead of every rank
    reading the owner's GPU. A barrier after each bucket keeps every rank's copy alive until SGLang
    has loaded it. ``engine`` is the owner's engine and None elsewhere; ``owner_rank`` is the
    owner's global rank, ``group`` the process group of the rollout-TP ranks (every rank iterates
    the same buckets in the same order). Returns the buckets sent.
    """
    import torch.distributed as dist

    if (tp_rank == 0) != (engine is not None):
        raise ValueError("update_weights_colocated_group: exactly the owner (tp_rank 0) passes the engine")
    sent = 0
    with engine.weight_update_session() if engine is not None else contextlib.nullcontext():
        for bucket in buckets:
            if not bucket:
                continue
            payload, = serialize_bucket(api, bucket)
            gathered = [None] * tp_size if tp_rank == 0 else None
            dist.gather_object(payload, gathered, dst=owner_rank, group=group)
            if engine is not None:
                engine.update_weights_from_payloads(gathered)
            dist.barrier(group=group)
            sent += 1
    if engine is not None:
        engine.flush_cache()
    return sent


VISION_PLACEHOLDERS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


def vision_placeholder_ids(tokenizer: Any) -> set[int]:
    """Ids of the Qwen-VL vision placeholder tokens in ``tokenizer`` (empty without one)."""
    if tokenizer is None:
        return set()
    unk = getattr(tokenizer, "unk_token_id", None)
    ids = set()
    for token in VISION_PLACEHOLDERS:
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != unk:
            ids.add(tid)
    return ids


def cut_at_placeholder(completion: Completion, placeholder_ids: set[int]) -> bool:
    """Cut ``completion`` (in place) before its first vision placeholder token; True if cut.

    SGLang may sample ``<|image_pad|>`` and friends (the HF engine suppresses them); in a response
    the trainer's forward would take one for an image slot and fail. The tokens before it are valid
    samples with valid log-probs, so the response is kept up to there and marked "length", the way
    a response cut by the token budget is.
    """
    for index, token in enumerate(completion.token_ids):
        if token in placeholder_ids:
            logger.warning("request %s sampled vision placeholder %d at position %d; response cut there",
                           completion.request_id, token, index)
            completion.token_ids = completion.token_ids[:index]
            completion.logprobs = completion.logprobs[:index]
            completion.finish_reason = "length"
            return True
    return False


def model_context_length(model_path: str) -> int:
    """``max_position_embeddings`` of the text model in ``model_path``'s ``config.json``: the context
    SGLang derives for the Qwen-VL models (``get_context_length``, no rope scaling factor there)."""
    from transformers import AutoConfig

    try:
        text_config = AutoConfig.from_pretrained(model_path).get_text_config()
    except (OSError, ValueError) as exc:
        raise ValueError(f"SGLangEngineConfig.context_length is unset and {model_path!r} has no readable config.json "
                         f"to take max_position_embeddings from: {exc}") from exc
    return int(text_config.max_position_embeddings)


# --------------------------------------------------------------------------- the engine
class SGLangRolloutEngine:
    """``RolloutEngine`` on one SGLang offline engine (one per rollout-TP group; only the group's
    owner rank constructs it, see ``rollout_placement``).

    Args:
        config: start-up and weight-sync settings.
        tokenizer: the policy tokenizer; gives the default stop tokens (eos, ``<|im_end|>``), decodes
            RGR prefixes of multimodal requests to text, and decodes completions (else SGLang's text).
        stop_token_ids: stop tokens always in force (default: from the tokenizer).
        api: the SGLang API surface; None loads the real one (the only import of sglang).
    """

    def __init__(self, config: SGLangEngineConfig, tokenizer: Any = None, *,
                 stop_token_ids: Iterable[int] | None = None, api: SGLangAPI | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.api = api if api is not None else load_sglang_api()
        check_sglang_version(self.api.version)
        check_logprob_convention()
        if stop_token_ids is None:
            stop_token_ids = []
            if tokenizer is not None:
                if getattr(tokenizer, "eos_token_id", None) is not None:
                    stop_token_ids.append(int(tokenizer.eos_token_id))
                im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
                if isinstance(im_end, int) and im_end != getattr(tokenizer, "unk_token_id", None):
                    stop_token_ids.append(im_end)
        self.stop_token_ids = sorted(set(int(t) for t in stop_token_ids))
        self.placeholder_token_ids = vision_placeholder_ids(tokenizer)
        self.placeholder_truncations = 0
        """Completions cut at a sampled vision placeholder (see ``cut_at_placeholder``)."""
        self.unsent_requests = 0
        """Requests answered without SGLang: too long for the context, or an RGR prefix SGLang would
        tokenise differently (see :meth:`fit_to_context`, :meth:`prefix_survives_retokenisation`)."""
        check_image_geometry(self.api, config)
        if config.context_length is None:
            config.context_length = model_context_length(config.model_path)
        self.context_length = config.context_length
        with engine_start_environment():
            self.engine = self.api.Engine(**config.engine_args(self.api))
        self.released: set[str] = set()
        """Protocol memory tags (``MEMORY_TAGS``) released and not yet resumed."""
        self.weights_lost = False
        """True from a release of the weights until the next completed ``update_weights``."""
        self._updates_at_release = 0
        self.weight_updates = 0
        """Buckets sent since start-up (for logs and tests)."""

    # ------------------------------------------------------------------ requests
    def fit_to_context(self, request: GenerationRequest, max_new_tokens: int) -> int:
        """The response budget ``request`` can be sent with: ``max_new_tokens`` cut so that prompt +
        response stays below ``context_length``; 0 when the prompt leaves no room (then it is not sent).

        SGLang raises ``ValueError`` for the whole ``generate`` call when one request has
        ``prompt >= context`` or ``prompt + max_new_tokens`` above the context (0.5.23; 0.5.3 already at
        equal), ``TokenizerManager._validate_one_request``; a response cut here ends as "length", like
        one cut by the budget.
        """
        prompt = len(request.prompt_ids) + len(request.prefix_ids)
        return max(0, min(int(max_new_tokens), self.context_length - 1 - prompt))

    def prefix_survives_retokenisation(self, request: GenerationRequest, prefix_text: str) -> bool:
        """Whether SGLang, tokenising ``prompt_text + prefix_text`` (an image request goes as text),
        gets the trainer's ``prompt_ids + prefix_ids``, the image placeholder runs aside (it expands
        each ``<|image_pad|>`` to the image's token count). A merge across the prompt / prefix border
        would make the behaviour log-probs condition on other tokens than the trainer scores."""
        def collapsed(ids):
            out = []
            for token in ids:
                if not (out and token == out[-1] and token in self.placeholder_token_ids):
                    out.append(int(token))
            return out

        sent = self.tokenizer(request.prompt_text + prefix_text)["input_ids"]
        return collapsed(sent) == collapsed(list(request.prompt_ids) + list(request.prefix_ids))

    def build_generate_calls(self, requests: list[GenerationRequest], sampling: SamplingParams) -> list[tuple[list[int], dict]]:
        """The ``Engine.generate`` calls for ``requests``: ``[(request indices, kwargs), ...]``.

        Text-only requests go as ``input_ids`` (prompt + prefix tokens, exactly what the trainer
        sees). Requests with images go as ``prompt`` text + ``image_data`` (SGLang expands the image
        placeholders itself), the RGR prefix decoded and appended to the text when SGLang re-tokenises
        that text to the same ids. ``prompt`` and ``input_ids`` cannot share a call, hence up to two
        calls. Requests left out of every call (no room in the context, a prefix that would
        re-tokenise differently) get an empty "length" completion from :meth:`generate`.
        """
        params = sglang_sampling_params(sampling, self.stop_token_ids)
        budgets = [self.fit_to_context(r, sampling.max_new_tokens) for r in requests]

        seeded = self.config.forward_sampling_seed and sampling.seed is not None

        def per_request(indices: list[int]):
            if not seeded and all(budgets[i] == params["max_new_tokens"] for i in indices):
                return params
            return [dict(params, max_new_tokens=budgets[i], **({"sampling_seed": int(sampling.seed) + i} if seeded else {}))
                    for i in indices]

        sendable = [i for i, budget in enumerate(budgets) if budget > 0]
        for i in sorted(set(range(len(requests))) - set(sendable)):
            logger.warning("request %s: prompt of %d tokens leaves no room in SGLang's context of %d; not sent",
                           requests[i].request_id, len(requests[i].prompt_ids) + len(requests[i].prefix_ids),
                           self.context_length)
        text_only = [i for i in sendable if not requests[i].images]
        with_images = [i for i in sendable if requests[i].images]
        calls = []
        if text_only:
            calls.append((text_only, dict(
                input_ids=[list(requests[i].prompt_ids) + list(requests[i].prefix_ids) for i in text_only],
                sampling_params=per_request(text_only), return_logprob=True, logprob_start_len=-1,
            )))
        if with_images:
            prompts, kept = [], []
            for i in with_images:
                r = requests[i]
                if not r.prompt_text:
                    raise ValueError(f"request {r.request_id!r} has images but no prompt_text (SGLang takes text + image_data)")
                prefix = ""
                if r.prefix_ids:
                    if self.tokenizer is None:
                        raise ValueError(f"request {r.request_id!r}: a multimodal RGR prefix needs the engine's tokenizer")
                    prefix = self.tokenizer.decode(r.prefix_ids, skip_special_tokens=False)
                    if not self.prefix_survives_retokenisation(r, prefix):
                        logger.warning("request %s: SGLang would tokenise prompt + RGR prefix differently from the "
                                       "trainer's ids; not sent", r.request_id)
                        continue
                prompts.append(r.prompt_text + prefix)
                kept.append(i)
            with_images = kept
        if with_images:
            calls.append((with_images, dict(
                prompt=prompts, image_data=[self.images_for_engine(requests[i]) for i in with_images],
                sampling_params=per_request(with_images), return_logprob=True, logprob_start_len=-1,
            )))
        return calls

    def images_for_engine(self, request: GenerationRequest) -> list[Any]:
        """The request's images at the trainer's resized size (see :func:`trainer_sized_image`)."""
        grid = request.image_grid_thw
        if grid is None or len(grid) != len(request.images):
            raise ValueError(f"request {request.request_id!r}: {len(request.images)} image(s) but image_grid_thw "
                             f"{None if grid is None else tuple(grid.shape)}; SGLang needs the trainer's image sizes")
        return [trainer_sized_image(image, row.tolist(), self.config.image_patch_size)
                for image, row in zip(request.images, grid)]

    def generate(self, requests: list[GenerationRequest], sampling: SamplingParams) -> list[Completion]:
        """One completion per request, in request order."""
        if self.asleep:
            raise RuntimeError(f"SGLangRolloutEngine.generate called while {', '.join(self.released)} "
                               "is released; call wake() first")
        if self.weights_lost:
            raise RuntimeError("SGLangRolloutEngine.generate: the weights were released (SGLang keeps no copy) and "
                               "not sent again; call update_weights after wake(('weights',)) before generating")
        if not requests:
            return []
        results: list[Completion | None] = [None] * len(requests)
        stop = set(self.stop_token_ids) | set(sampling.stop_token_ids)
        calls = self.build_generate_calls(requests, sampling)
        sent = {i for indices, _ in calls for i in indices}
        for i, request in enumerate(requests):
            if i not in sent:
                results[i] = Completion(request_id=request.request_id, token_ids=[], text="", logprobs=[],
                                        finish_reason="length")
                self.unsent_requests += 1
        for indices, kwargs in calls:
            outputs = self.engine.generate(**kwargs)
            if isinstance(outputs, dict):
                outputs = [outputs]
            if len(outputs) != len(indices):
                raise RuntimeError(f"SGLang returned {len(outputs)} outputs for {len(indices)} requests")
            for i, out in zip(indices, outputs):
                comp = completion_from_sglang_output(requests[i].request_id, out, stop)
                if cut_at_placeholder(comp, self.placeholder_token_ids):
                    self.placeholder_truncations += 1
                if self.tokenizer is not None:
                    ids = comp.token_ids[:-1] if comp.token_ids and comp.token_ids[-1] in stop else comp.token_ids
                    comp.text = self.tokenizer.decode(ids, skip_special_tokens=False)
                results[i] = comp
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ weights
    @contextlib.contextmanager
    def weight_update_session(self) -> Iterator[None]:
        """``begin_weight_update()`` ... ``end_weight_update()`` around one sync's buckets where SGLang
        has them (0.5.23 refuses tensor updates outside); closed even when a bucket fails, so the
        next sync can open its own."""
        if not self.api.weight_update_session:
            yield
            return
        self._check(self.engine.begin_weight_update(), "begin_weight_update")
        try:
            yield
        finally:
            self._check(self.engine.end_weight_update(), "end_weight_update")

    def update_weights_from_payloads(self, payloads: list[Any]) -> None:
        """Load one bucket given as one serialised payload per rollout-TP rank (rank order), inside a
        :meth:`weight_update_session`. Does not flush the cache: call ``flush_cache`` after the last bucket."""
        if len(payloads) != self.config.tp_size:
            raise ValueError(f"update_weights_from_payloads: {len(payloads)} payloads for tp_size {self.config.tp_size}")
        if "weights" in self.released:
            raise RuntimeError("update_weights while SGLang's weights are released; call wake(('weights',)) first")
        self._check(self.engine.update_weights_from_tensor(
            named_tensors=list(payloads), load_format="flattened_bucket", flush_cache=False,
        ), "update_weights_from_tensor")
        self.weight_updates += 1

    def flush_cache(self) -> None:
        """Drop the radix / KV cache (computed with the previous weights). Ends a weight update: the
        weights sent since the last release are the engine's weights again."""
        self.engine.flush_cache()
        if self.weight_updates > self._updates_at_release:
            self.weights_lost = False

    def update_weights_from_buckets(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> None:
        """Send buckets as they come (e.g. ``TrainingBackend.export_weights``), then flush the cache.

        Single-process form: this rank flattens each bucket once and serialises it once per rollout-TP
        rank, so every SGLang rank reads this rank's GPU memory over IPC through its own handle. When every rank of the group holds the
        bucket on its own GPU, use :func:`update_weights_colocated_group` instead. Peak extra memory
        is one flattened copy of the current bucket (the call is synchronous, then it is released).
        """
        with self.weight_update_session():
            for bucket in buckets:
                if bucket:
                    self.update_weights_from_payloads(serialize_bucket(self.api, bucket, self.config.tp_size))
        self.flush_cache()

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Protocol entry: bucket the stream by ``weight_bucket_mb`` and send it (colocated)."""
        self.update_weights_from_buckets(bucket_named_tensors(named_tensors, self.config.weight_bucket_mb << 20))

    @staticmethod
    def _check(result: Any, what: str) -> None:
        """SGLang answers ``(success, message)`` (or a dict with ``success``); raise on failure."""
        if result is None:
            return
        if isinstance(result, dict):
            ok, message = result.get("success", True), result.get("message", "")
        elif isinstance(result, (tuple, list)) and result and isinstance(result[0], bool):
            ok, message = result[0], result[1] if len(result) > 1 else ""
        else:
            return
        if not ok:
            raise RuntimeError(f"SGLang {what} failed: {message}")

    # ------------------------------------------------------------------ memory
    @property
    def asleep(self) -> bool:
        """True while any memory is released (generation needs weights and KV cache)."""
        return bool(self.released)

    def sglang_memory_tags(self, tags: Sequence[str]) -> list[str]:
        """SGLang's tags for protocol ``tags``: CUDA-graph memory, where SGLang tags it separately,
        travels with the KV cache (both are only needed for decoding)."""
        out = []
        for tag in tags:
            out.append(tag)
            if tag == "kv_cache" and self.api.cuda_graph_memory_tag:
                out.append("cuda_graph")
        return out

    def sleep(self, tags: Sequence[str] | None = None) -> None:
        """Release ``tags`` (None: weights and KV cache; needs ``enable_memory_saver``). Released
        weights are gone (no CPU backup): the next ``wake`` must be followed by ``update_weights``,
        which the colocated step does, before ``generate``."""
        todo = [t for t in memory_tags(tags) if t not in self.released]
        if not todo:
            return
        self.engine.release_memory_occupation(tags=self.sglang_memory_tags(todo))
        self.released.update(todo)
        if "weights" in todo:
            self.weights_lost = True
            self._updates_at_release = self.weight_updates

    def wake(self, tags: Sequence[str] | None = None) -> None:
        """Resume ``tags`` (None: all released). Colocated order: ``wake(("weights",))``, weight
        sync, ``wake(("kv_cache",))``, so the KV cache is not allocated while buckets are in flight."""
        todo = [t for t in memory_tags(tags) if t in self.released]
        if not todo:
            return
        self.engine.resume_memory_occupation(tags=self.sglang_memory_tags(todo))
        self.released.difference_update(todo)

    def shutdown(self) -> None:
        self.engine.shutdown()
