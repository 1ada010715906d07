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
  the patch size; see :func:`trainer_sized_image`), so SGLang's own resizing is the identity and its
  image token counts equal the trainer's. One dict per request with ``output_ids`` / ``text`` and ``meta_info``
  holding ``output_token_logprobs`` = ``[(logprob, token_id, text|None), ...]`` and ``finish_reason``
  = ``{"type": "stop" | "length" | "abort", ...}``;
* ``update_weights_from_tensor(named_tensors, load_format="flattened_bucket", flush_cache=False)``:
  colocated weight sync. Each bucket is one flat tensor plus ``FlattenedTensorMetadata`` entries,
  serialised with ``MultiprocessingSerializer`` (CUDA tensors travel as CUDA-IPC handles: no copy
  through host memory), one payload per rollout-TP rank;
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

GPU placement rule (``rollout_placement``): the launcher's local ranks on a node are cut into
consecutive groups of ``rollout_tp`` ranks; group ``g`` runs one engine on GPUs
``g * rollout_tp ... g * rollout_tp + rollout_tp - 1``, so ``base_gpu_id = g * rollout_tp`` (an
index into the GPUs the launcher process sees). Only the first rank of a group starts and drives
the engine; an engine never spans nodes, so ``rollout_tp`` must divide the GPUs per node.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

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


def load_sglang_api() -> SGLangAPI:
    """Import SGLang (the one place this package does), check its version, return its API surface."""
    try:
        import sglang
        from sglang.srt import constants as sglang_constants
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
    )
    check_sglang_version(api.version)
    return api


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
    image_min_pixels: int | None = None
    """The trainer's ``data.min_pixels`` (checked against SGLang's own resize bounds at start-up)."""
    image_max_pixels: int | None = None
    """The trainer's ``data.max_pixels`` (ditto)."""
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
        if self.image_patch_size < 1:
            raise ValueError(f"SGLangEngineConfig.image_patch_size must be >= 1, got {self.image_patch_size}")
        # SGLang 0.5.3 resizes every image into [SGLANG_MIN_IMAGE_PIXELS, SGLANG_MAX_IMAGE_PIXELS]
        # before its processor; a trainer size outside that range would be changed there.
        if self.image_min_pixels is not None and self.image_min_pixels < SGLANG_MIN_IMAGE_PIXELS:
            raise ValueError(f"config field 'data.min_pixels' is {self.image_min_pixels}, below SGLang's fixed "
                             f"minimum {SGLANG_MIN_IMAGE_PIXELS}: SGLang would enlarge smaller images and its "
                             "image tokens would differ from the trainer's; raise data.min_pixels")
        if self.image_max_pixels is not None and self.image_max_pixels > SGLANG_MAX_IMAGE_PIXELS:
            raise ValueError(f"config field 'data.max_pixels' is {self.image_max_pixels}, above SGLang's default "
                             f"maximum {SGLANG_MAX_IMAGE_PIXELS}: SGLang would shrink larger images; lower it")

    def engine_args(self) -> dict[str, Any]:
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
        args.update(self.engine_kwargs)
        return args


# --------------------------------------------------------------------------- pure helpers
SGLANG_IMAGE_FACTOR = 28
SGLANG_MIN_IMAGE_PIXELS = 4 * 28 * 28
SGLANG_MAX_IMAGE_PIXELS = 16384 * 28 * 28
"""SGLang's Qwen-VL image resize: factor 28 and pixel bounds ``MIN_PIXELS`` / ``MAX_PIXELS`` of
``multimodal/processors/qwen_vl.py`` (0.5.3 fixed; 0.5.23 the default of ``SGLANG_IMAGE_MAX_PIXELS``)."""


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
    "length" map over; "abort" (e.g. a prompt longer than the context) becomes "length" with a
    warning, so one bad prompt does not stop the run.
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


def serialize_bucket(api: SGLangAPI, bucket: list[tuple[str, torch.Tensor]]) -> Any:
    """``MultiprocessingSerializer.serialize({"flattened_tensor", "metadata"})`` of one bucket: the
    payload ``update_weights_from_tensor(load_format="flattened_bucket")`` takes for one TP rank."""
    flat, metadata = flatten_bucket(bucket, api.FlattenedTensorMetadata)
    return api.MultiprocessingSerializer.serialize({"flattened_tensor": flat, "metadata": metadata})


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
    for bucket in buckets:
        if not bucket:
            continue
        payload = serialize_bucket(api, bucket)
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
        self.engine = self.api.Engine(**config.engine_args())
        self.released: set[str] = set()
        """Protocol memory tags (``MEMORY_TAGS``) released and not yet resumed."""
        self.weights_lost = False
        """True from a release of the weights until the next completed ``update_weights``."""
        self._updates_at_release = 0
        self.weight_updates = 0
        """Buckets sent since start-up (for logs and tests)."""

    # ------------------------------------------------------------------ requests
    def build_generate_calls(self, requests: list[GenerationRequest], sampling: SamplingParams) -> list[tuple[list[int], dict]]:
        """The ``Engine.generate`` calls for ``requests``: ``[(request indices, kwargs), ...]``.

        Text-only requests go as ``input_ids`` (prompt + prefix tokens, exactly what the trainer
        sees). Requests with images go as ``prompt`` text + ``image_data`` (SGLang expands the image
        placeholders itself), the RGR prefix decoded and appended to the text. ``prompt`` and
        ``input_ids`` cannot share a call, hence up to two calls.
        """
        params = sglang_sampling_params(sampling, self.stop_token_ids)

        def per_request(indices: list[int]):
            if not (self.config.forward_sampling_seed and sampling.seed is not None):
                return params
            return [dict(params, sampling_seed=int(sampling.seed) + i) for i in indices]

        text_only = [i for i, r in enumerate(requests) if not r.images]
        with_images = [i for i, r in enumerate(requests) if r.images]
        calls = []
        if text_only:
            calls.append((text_only, dict(
                input_ids=[list(requests[i].prompt_ids) + list(requests[i].prefix_ids) for i in text_only],
                sampling_params=per_request(text_only), return_logprob=True, logprob_start_len=-1,
            )))
        if with_images:
            prompts = []
            for i in with_images:
                r = requests[i]
                if not r.prompt_text:
                    raise ValueError(f"request {r.request_id!r} has images but no prompt_text (SGLang takes text + image_data)")
                prefix = ""
                if r.prefix_ids:
                    if self.tokenizer is None:
                        raise ValueError(f"request {r.request_id!r}: a multimodal RGR prefix needs the engine's tokenizer")
                    prefix = self.tokenizer.decode(r.prefix_ids, skip_special_tokens=False)
                prompts.append(r.prompt_text + prefix)
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
        for indices, kwargs in self.build_generate_calls(requests, sampling):
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
    def serialize_bucket(self, bucket: list[tuple[str, torch.Tensor]]) -> Any:
        """One flattened bucket serialised for SGLang (CUDA tensors become CUDA-IPC handles)."""
        return serialize_bucket(self.api, bucket)

    def update_weights_from_payloads(self, payloads: list[Any]) -> None:
        """Load one bucket given as one serialised payload per rollout-TP rank (rank order). Does
        not flush the cache: call ``flush_cache`` after the last bucket."""
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

        Single-process form: this rank serialises each bucket once per rollout-TP rank, so every
        SGLang rank reads this rank's GPU memory over IPC. When every rank of the group holds the
        bucket on its own GPU, use :func:`update_weights_colocated_group` instead. Peak extra memory
        is one flattened copy of the current bucket (the call is synchronous, then it is released).
        """
        for bucket in buckets:
            if not bucket:
                continue
            payload = self.serialize_bucket(bucket)
            self.update_weights_from_payloads([payload] * self.config.tp_size)
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
