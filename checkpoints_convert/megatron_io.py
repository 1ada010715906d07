"""Megatron checkpoint files: ``torch_dist`` distributed checkpoints and legacy per-rank files.

The only module of ``checkpoints_convert`` that imports ``megatron.core`` (lazily, with a clear
error naming the ``[megatron]`` extra when it is missing).

``torch_dist`` format. The keys and global layouts of a Megatron distributed checkpoint are what
``GPTModel.sharded_state_dict()`` declares (layer-stacked keys such as
``decoder.layers.self_attention.linear_qkv.weight`` with a leading layer axis, the SwiGLU
``linear_fc1`` split into its gate and up halves, TE-style norm names even for the local spec).
Rather than re-deriving those by hand, the converter builds a *template* ``GPTModel`` at TP = PP = 1
in a single gloo process (weights uninitialised), copies each converted tensor into it, and saves
``template.sharded_state_dict()`` plus replicated ``vision_model.*`` ShardedTensors. Because the
checkpoint is a set of global tensors, Megatron reshards it on load to any TP / PP. The one
TP-dependent quantity is the padded vocabulary, chosen as ``padded_vocab_size(V, tp)`` for the TP
given on the command line and recorded in ``conversion.json``; a model provider must build its
embedding with that size.

Directory layout written by :func:`save_torch_dist` (Megatron-LM's release convention)::

    OUT/latest_checkpointed_iteration.txt      "release"
    OUT/release/                               the torch_dist checkpoint (metadata.json, *.distcp, common.pt)
    OUT/hf/                                    config, tokenizer, processor files copied from the HF dir
    OUT/conversion.json                        architecture, padded vocab, layernorm naming, dtype, format

Legacy format (:func:`save_legacy`): ``OUT/release/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt``
holding ``{"model": state_dict}`` (``model0``, ``model1``, ... per virtual stage), the layout of
:func:`care_megatron.models.weight_mapping.hf_to_megatron_state_dicts`; loadable only at the TP / PP it was
written for.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Callable, Iterable, Mapping, Optional

import torch

from care_megatron.models.weight_mapping.rules import (ArchitectureSpec, LanguageModelDims, ParallelLayout, TensorRule,
                                                       padded_vocab_size, rule_to_megatron_shards)

CONVERSION_FILE = "conversion.json"
RELEASE_DIR = "release"
HF_ASSETS_DIR = "hf"
# Key prefixes of the torch_dist checkpoint: those of QwenVLMegatronModel's sharded state dict
# (care_megatron/training/megatron/checkpoint.py: ``language_model.`` + GPTModel keys, ``vision.`` +
# ``vision_model.*``), so a converted checkpoint loads straight into the Megatron backend.
LANGUAGE_KEY_PREFIX = "language_model."
VISION_KEY_PREFIX = "vision."


def _require_megatron():
    try:
        import megatron.core  # noqa: F401
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("writing / reading Megatron checkpoints needs megatron-core: "
                          "pip install care_megatron[megatron]") from error


def ensure_single_process_group() -> None:
    """A world-size-1 gloo group and Megatron model-parallel state at TP = PP = 1 (no-op when present)."""
    _require_megatron()
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            import socket

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    elif (parallel_state.get_tensor_model_parallel_world_size() != 1
          or parallel_state.get_pipeline_model_parallel_world_size() != 1):
        # The template model must hold whole tensors; inside a TP/PP job it would be sharded.
        raise RuntimeError("checkpoint conversion builds a TP = PP = 1 template model; run it in its own process, "
                           "not inside a model-parallel job")


def build_template_gpt(dims: LanguageModelDims, padded_vocab: int, dtype: torch.dtype = torch.float32,
                       rms_norm_eps: float = 1e-6):
    """An uninitialised TP = PP = 1 ``GPTModel`` (local spec) whose sharded state dict defines the checkpoint."""
    ensure_single_process_group()
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=dims.num_layers, hidden_size=dims.hidden_size, num_attention_heads=dims.num_attention_heads,
        num_query_groups=dims.num_key_value_heads, kv_channels=dims.head_dim, ffn_hidden_size=dims.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=rms_norm_eps, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=dims.qkv_bias,
        qk_layernorm=dims.qk_layernorm, use_cpu_initialization=True, perform_initialization=False,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16)
    spec = get_gpt_layer_local_spec(qk_layernorm=dims.qk_layernorm, normalization="RMSNorm")
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=padded_vocab,
                    max_sequence_length=4096, share_embeddings_and_output_weights=dims.tie_word_embeddings,
                    position_embedding_type="rope")


@contextlib.contextmanager
def _cpu_safe_dist_checkpointing():
    """megatron-core 0.16.1's torch_dist save calls ``torch.cuda.synchronize()`` after its CPU preload
    and builds a status tensor on ``torch.cuda.current_device()``; on a CUDA-less torch both raise.
    For the duration of a save / load only, the first is a no-op and the second returns ``"cpu"``
    (the same mapping as ``care_megatron.training.megatron.cpu_compat``)."""
    if torch.cuda.is_available():
        yield
        return
    originals = torch.cuda.synchronize, torch.cuda.current_device
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_device = lambda: "cpu"
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = originals


def _vision_sharded_tensors(vision: Mapping[str, torch.Tensor], prefix: str) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return {prefix + name: ShardedTensor.from_rank_offsets(prefix + name, tensor, replica_id=0)
            for name, tensor in vision.items()}


def save_torch_dist(out_dir: str, rules: list[TensorRule], fetch_hf: Callable[[TensorRule], list[torch.Tensor]],
                    spec: ArchitectureSpec, dims: LanguageModelDims, target_tp: int, dtype: torch.dtype,
                    rms_norm_eps: float, progress: Optional[Callable[[TensorRule], None]] = None,
                    language_prefix: str = LANGUAGE_KEY_PREFIX, vision_prefix: str = VISION_KEY_PREFIX) -> dict:
    """Fill a template GPTModel rule by rule (``rules`` at TP = PP = 1) and save it as ``torch_dist``.

    ``fetch_hf(rule)`` returns the rule's HF tensors (read lazily); each is copied into the template
    and dropped, so peak memory is one model plus one layer. Returns the metadata written.
    """
    from care_megatron.training.megatron.checkpoint import save_distributed

    padded = padded_vocab_size(dims.vocab_size, target_tp)
    layout = ParallelLayout(tp=1, pp=1, padded_vocab=padded)
    model = build_template_gpt(dims, padded, dtype, rms_norm_eps)
    params = dict(model.named_parameters())
    vision: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for rule in rules:
            (tensor,) = rule_to_megatron_shards(rule, fetch_hf(rule), dims, layout)
            if rule.megatron_name.startswith("vision_model."):
                vision[rule.megatron_name] = tensor.to(dtype).clone()
            else:
                target = params.get(rule.megatron_name)
                if target is None or target.shape != tensor.shape:
                    raise ValueError(f"template GPTModel has no parameter {rule.megatron_name} of shape "
                                     f"{tuple(tensor.shape)} (found {None if target is None else tuple(target.shape)})")
                target.copy_(tensor)
            if progress is not None:
                progress(rule)
    sharded = model.sharded_state_dict(prefix=language_prefix)
    sharded.update(_vision_sharded_tensors(vision, vision_prefix))
    checkpoint_dir = os.path.join(out_dir, RELEASE_DIR)
    os.makedirs(checkpoint_dir, exist_ok=True)
    with _cpu_safe_dist_checkpointing():
        save_distributed(sharded, checkpoint_dir)  # with the common.pt megatron-core < 0.17 reads
    with open(os.path.join(out_dir, "latest_checkpointed_iteration.txt"), "w") as handle:
        handle.write("release")
    return {"format": "torch_dist", "padded_vocab_size": padded, "vision_names": sorted(vision),
            "language_key_prefix": language_prefix, "vision_key_prefix": vision_prefix}


def torch_dist_layout(ckpt_dir: str, language_prefix: str = LANGUAGE_KEY_PREFIX,
                      vision_prefix: str = VISION_KEY_PREFIX) -> tuple[int, list[str]]:
    """(padded vocab, vision tensor names ``vision_model.*``) read from a torch_dist checkpoint's metadata.

    Lets :func:`load_torch_dist` read checkpoints the training backend saved itself (no
    ``conversion.json``), e.g. ``<run>/checkpoints/step_N/model``.
    """
    from megatron.core import dist_checkpointing

    from care_megatron.training.megatron.checkpoint import require_loadable

    require_loadable(_release(ckpt_dir))
    with _cpu_safe_dist_checkpointing():
        metadata = dist_checkpointing.load_tensors_metadata(_release(ckpt_dir))
    embedding = metadata.get(language_prefix + "embedding.word_embeddings.weight")
    if embedding is None:
        raise ValueError(f"{ckpt_dir}: no {language_prefix}embedding.word_embeddings.weight in the checkpoint "
                         f"(keys look like {sorted(metadata)[:3]}); wrong key prefixes?")
    vision = sorted(k[len(vision_prefix):] for k in metadata if k.startswith(vision_prefix + "vision_model."))
    return int(embedding.global_shape[0]), vision


def load_torch_dist(ckpt_dir: str, dims: LanguageModelDims, padded_vocab: int, vision_names: Iterable[str],
                    dtype: torch.dtype, rms_norm_eps: float, language_prefix: str = LANGUAGE_KEY_PREFIX,
                    vision_prefix: str = VISION_KEY_PREFIX) -> dict[str, torch.Tensor]:
    """Load a ``torch_dist`` checkpoint into TP = PP = 1 names (the ``(0, 0)`` shard of the mapping)."""
    from megatron.core import dist_checkpointing

    from care_megatron.training.megatron.checkpoint import require_loadable

    require_loadable(_release(ckpt_dir))
    model = build_template_gpt(dims, padded_vocab, dtype, rms_norm_eps)
    sharded = model.sharded_state_dict(prefix=language_prefix)
    vision_names = list(vision_names)
    placeholders = {}
    if vision_names:
        with _cpu_safe_dist_checkpointing():
            metadata = dist_checkpointing.load_tensors_metadata(_release(ckpt_dir))
        placeholders = {name: torch.empty(metadata[vision_prefix + name].global_shape,
                                          dtype=metadata[vision_prefix + name].dtype) for name in vision_names}
        sharded.update(_vision_sharded_tensors(placeholders, vision_prefix))
    with _cpu_safe_dist_checkpointing():
        loaded = dist_checkpointing.load(sharded, _release(ckpt_dir))
    vision = {name: loaded.pop(vision_prefix + name) for name in placeholders}
    language = {k[len(language_prefix):]: v for k, v in loaded.items() if k.startswith(language_prefix)}
    missing, _ = model.load_state_dict(language, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing:
        raise ValueError(f"{ckpt_dir} lacks {missing[:4]}")
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()
             if torch.is_tensor(tensor) and not name.endswith("_extra_state")}
    state.update(vision)
    return state


def _release(ckpt_dir: str) -> str:
    nested = os.path.join(ckpt_dir, RELEASE_DIR)
    return nested if os.path.isdir(nested) else ckpt_dir


def legacy_rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    """Megatron-LM's per-rank folder name: ``mp_rank_XX`` (PP = 1) or ``mp_rank_XX_YYY``."""
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def save_legacy(out_dir: str, shards: Mapping[tuple, Mapping[str, torch.Tensor]], layout: ParallelLayout) -> dict:
    """Write ``{(pp, tp[, vp]): state_dict}`` as per-rank ``model_optim_rng.pt`` files."""
    for pp_rank in range(layout.pp):
        for tp_rank in range(layout.tp):
            if layout.vp is None:
                payload = {"model": dict(shards[(pp_rank, tp_rank)])}
            else:
                payload = {f"model{v}": dict(shards[(pp_rank, tp_rank, v)]) for v in range(layout.vp)}
            payload.update(checkpoint_version=3.0, iteration=0)
            rank_dir = os.path.join(out_dir, RELEASE_DIR, legacy_rank_dir(tp_rank, pp_rank, layout.pp))
            os.makedirs(rank_dir, exist_ok=True)
            torch.save(payload, os.path.join(rank_dir, "model_optim_rng.pt"))
    with open(os.path.join(out_dir, "latest_checkpointed_iteration.txt"), "w") as handle:
        handle.write("release")
    return {"format": "legacy"}


def load_legacy(ckpt_dir: str, layout: ParallelLayout) -> dict[tuple, dict[str, torch.Tensor]]:
    """Read per-rank ``model_optim_rng.pt`` files back into ``{(pp, tp[, vp]): state_dict}``."""
    shards = {}
    for pp_rank in range(layout.pp):
        for tp_rank in range(layout.tp):
            path = os.path.join(_release(ckpt_dir), legacy_rank_dir(tp_rank, pp_rank, layout.pp), "model_optim_rng.pt")
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if layout.vp is None:
                shards[(pp_rank, tp_rank)] = payload["model"]
            else:
                for v in range(layout.vp):
                    shards[(pp_rank, tp_rank, v)] = payload[f"model{v}"]
    return shards


def write_conversion_metadata(out_dir: str, metadata: dict) -> None:
    with open(os.path.join(out_dir, CONVERSION_FILE), "w") as handle:
        json.dump(metadata, handle, indent=2, sort_keys=True)


def read_conversion_metadata(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, CONVERSION_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {ckpt_dir} was not written by checkpoints_convert/hf_to_megatron.py "
                                "(it records the architecture, padded vocab and HF config there)")
    with open(path) as handle:
        return json.load(handle)
