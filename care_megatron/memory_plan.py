"""Per-GPU memory plan of a run config, phase by phase, with a verdict against the GPU's memory.

Used by ``tools/estimate_memory.py`` and printed by ``care-train`` at the start of a run on GPU.

A colocated RL step moves through three memory phases (issue 13); the peak of the step is the
largest of them:

* ``generate`` -- the rollout engine is awake (its static pool: weights + KV cache, a fixed
  ``rollout.mem_fraction_static`` of the GPU, plus its own runtime buffers) and the trainer is asleep:
  weights, gradients, optimizer state and the reference model are offloaded to host memory, so the
  trainer holds only its CUDA context.
* ``weight_sync`` -- the trainer restores only its parameter storages (not gradients, fp32 masters,
  Adam moments or the reference model); the engine wakes its weights before the sync and its KV cache
  only after it; two transfer buckets of ``rollout.weight_bucket_mb`` are in flight.
* ``train`` -- forward / backward / optimizer with the engine asleep (weights and KV cache released by
  its memory saver; its CUDA context stays): parameters, gradients, optimizer state, the reference
  model (unless ``parallel.offload_reference_to_cpu``), activations of the micro-batches in flight and
  the log-prob logits of one micro-batch.

Assumptions (each a named constant or argument, so they can be changed and are visible in the output):

* Parameter count from the architecture's shapes (language model + vision tower + merger), within about
  1% of the released checkpoints; every parameter is split over TP x PP (the vision tower too).
* Megatron backend: weights in ``model.dtype``; gradients in fp32 (``grad_reduce_in_fp32=True`` in the
  backend's DDP config); Adam with fp32 master copy, m and v (12 bytes per parameter), sharded over the
  data-parallel x context-parallel ranks with ``use_distributed_optimizer`` and replicated otherwise.
  Torch backend: gradients and both Adam moments in the parameter dtype, one GPU holds everything.
* Activations per token and layer (bf16, flash attention so no s^2 score matrix, no dropout): the two
  norm inputs (2h), the QKV output (h + 2 kv), the attention output (h), the gate and up outputs (2I)
  and the SwiGLU output (I). Tensor parallelism divides them by TP, except the two norm inputs, which
  only sequence parallelism divides. ``recompute: selective`` keeps them all (it drops only the score
  matrix, which flash attention never stores); ``full`` keeps each layer's input (h) plus one layer's
  full set during its recomputation. Context parallelism divides the tokens of a micro-batch; under
  pipeline parallelism the first stage holds PP micro-batches in flight (1F1B).
  Vision-tower activations are not counted (small against the language model's at these pixel budgets).
* Logits: one micro-batch's fp32 logits for its vocabulary shard (conservative: the fused log-prob
  kernel chunks them on GPU).
* Engine: KV cache of ``2 x layers x max(1, kv_heads / rollout_tp) x head_dim`` bf16 values per token;
  the static pool holds the engine's weights (split over the rollout TP) and the KV cache.
* Fixed costs: a CUDA context, NCCL buffers and allocator slack per process, ``TRAINER_OVERHEAD_GIB``
  for the trainer and ``ENGINE_OVERHEAD_GIB`` for the engine (CUDA graphs, sampling buffers outside the
  static pool).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

GIB = 1024 ** 3
TRAINER_OVERHEAD_GIB = 4.0
ENGINE_OVERHEAD_GIB = 3.0
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """The shapes that decide memory: language model and vision tower."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    qkv_bias: bool = True
    qk_norm: bool = False
    vision_hidden: int = 0
    vision_intermediate: int = 0
    vision_layers: int = 0
    vision_gated_mlp: bool = True
    patch_elems: int = 3 * 2 * 14 * 14
    """Values per patch: channels x temporal patch x patch size^2."""
    vision_mergers: int = 1
    """Patch mergers (1, plus the DeepStack mergers of Qwen3-VL)."""
    vision_position_embeddings: int = 0

    def language_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0) + (2 * self.head_dim if self.qk_norm else 0)
        layer = attention + 3 * h * self.intermediate + 2 * h
        embeddings = self.vocab * h * (1 if self.tied_embeddings else 2)
        return self.layers * layer + embeddings + h

    def vision_params(self) -> int:
        if not self.vision_layers:
            return 0
        vh, vi = self.vision_hidden, self.vision_intermediate
        merged = 4 * vh
        merger_linears = merged * merged + merged + merged * self.hidden + self.hidden
        if self.vision_gated_mlp:  # Qwen2.5-VL: SwiGLU MLP, RMSNorms (one weight), merger norm over vh
            block = 4 * vh * vh + 4 * vh + (3 * vh * vi + 2 * vi + vh) + 2 * vh
            patch, mergers = self.patch_elems * vh, merger_linears + vh
        else:  # Qwen3-VL: GELU MLP, LayerNorms (weight + bias), biased patch embedding, DeepStack mergers over 4 vh
            block = 4 * vh * vh + 4 * vh + (2 * vh * vi + vi + vh) + 4 * vh
            patch = self.patch_elems * vh + vh
            mergers = merger_linears + 2 * vh + (self.vision_mergers - 1) * (merger_linears + 2 * merged)
        return patch + self.vision_position_embeddings * vh + self.vision_layers * block + mergers

    def params(self) -> int:
        return self.language_params() + self.vision_params()

    @classmethod
    def from_hf_config(cls, config: dict) -> "ModelShape":
        """From a Hugging Face ``config.json`` of Qwen2.5-VL or Qwen3-VL (nested ``text_config`` or flat)."""
        text = config.get("text_config") or config
        vision = config.get("vision_config") or {}
        qwen3 = "qwen3" in str(config.get("model_type", ""))
        heads = text["num_attention_heads"]
        return cls(
            hidden=text["hidden_size"], intermediate=text["intermediate_size"], layers=text["num_hidden_layers"],
            heads=heads, kv_heads=text.get("num_key_value_heads", heads),
            head_dim=text.get("head_dim") or text["hidden_size"] // heads, vocab=text["vocab_size"],
            tied_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            qkv_bias=not qwen3, qk_norm=qwen3,
            vision_hidden=vision.get("hidden_size", 0), vision_intermediate=vision.get("intermediate_size", 0),
            vision_layers=vision.get("depth", 0), vision_gated_mlp=not qwen3,
            patch_elems=vision.get("in_channels", 3) * vision.get("temporal_patch_size", 2) * vision.get("patch_size", 14) ** 2,
            vision_mergers=1 + len(vision.get("deepstack_visual_indexes", []) or []),
            vision_position_embeddings=vision.get("num_position_embeddings", 0) if qwen3 else 0)


# Shapes of the released checkpoints the example configs name (from their config.json), so the plan
# can be made on a machine that does not hold the weights.
KNOWN_SHAPES = {
    "Qwen2.5-VL-3B-Instruct": ModelShape(hidden=2048, intermediate=11008, layers=36, heads=16, kv_heads=2, head_dim=128,
                                         vocab=151936, tied_embeddings=True, vision_hidden=1280,
                                         vision_intermediate=3420, vision_layers=32),
    "Qwen2.5-VL-7B-Instruct": ModelShape(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, head_dim=128,
                                         vocab=152064, tied_embeddings=False, vision_hidden=1280,
                                         vision_intermediate=3420, vision_layers=32),
    "Qwen3-VL-8B-Instruct": ModelShape(hidden=4096, intermediate=12288, layers=36, heads=32, kv_heads=8, head_dim=128,
                                       vocab=151936, tied_embeddings=False, qkv_bias=False, qk_norm=True,
                                       vision_hidden=1152, vision_intermediate=4304, vision_layers=27,
                                       vision_gated_mlp=False, patch_elems=3 * 2 * 16 * 16, vision_mergers=4,
                                       vision_position_embeddings=2304),
}


def model_shape(model_config) -> ModelShape:
    """The shape of ``model.name``: its ``config.json`` when the directory exists, else the known table."""
    config_file = Path(model_config.name) / "config.json"
    if config_file.is_file():
        return ModelShape.from_hf_config(json.loads(config_file.read_text()))
    name = Path(model_config.name).name
    if name in KNOWN_SHAPES:
        return KNOWN_SHAPES[name]
    if not Path(model_config.name).exists():
        from care_megatron.models import build_hf_config  # registry tiny models

        try:
            return ModelShape.from_hf_config(build_hf_config(model_config.name).to_dict())
        except (KeyError, ValueError) as exc:
            raise ValueError(f"config field 'model.name': no shape known for {model_config.name!r}") from exc
    raise ValueError(f"config field 'model.name': {config_file} not found and {name!r} is not a known checkpoint")


@dataclass
class MemoryPlan:
    gpu_memory_gib: float
    gpus: int
    params: int
    parallel: dict
    phases: dict[str, dict[str, float]]
    """Phase -> component -> GiB."""
    kv_cache_tokens: int
    kv_cache_demand_tokens: int

    def phase_total(self, phase: str) -> float:
        return sum(self.phases[phase].values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_total)

    @property
    def peak_gib(self) -> float:
        return self.phase_total(self.peak_phase)

    @property
    def fits(self) -> bool:
        return self.peak_gib <= self.gpu_memory_gib and self.kv_cache_tokens > 0

    def report(self) -> str:
        p = self.parallel
        lines = [f"memory plan: {self.params / 1e9:.2f}B parameters on {self.gpus} GPUs of {self.gpu_memory_gib:.1f} GiB "
                 f"(TP={p['tp']} PP={p['pp']} CP={p['cp']} DP={p['dp']}, rollout TP={p['rollout_tp']})"]
        for phase, parts in self.phases.items():
            detail = ", ".join(f"{k} {v:.1f}" for k, v in parts.items() if v)
            lines.append(f"  {phase:<12} {self.phase_total(phase):7.1f} GiB  ({detail})")
        lines.append(f"  KV cache: {self.kv_cache_tokens:,} tokens per engine; one step's rollouts need up to "
                     f"{self.kv_cache_demand_tokens:,} at once ({'all concurrent' if self.kv_cache_tokens >= self.kv_cache_demand_tokens else 'SGLang queues the rest'})")
        verdict = "FITS" if self.fits else "DOES NOT FIT"
        lines.append(f"  peak {self.peak_gib:.1f} GiB in '{self.peak_phase}' of {self.gpu_memory_gib:.1f} GiB: {verdict}")
        return "\n".join(lines)


def plan_memory(config, gpu_memory_gib: float = 79.6, gpus: int = 8, shape: Optional[ModelShape] = None,
                prompt_tokens: int = 1024, trainer_overhead_gib: float = TRAINER_OVERHEAD_GIB,
                engine_overhead_gib: float = ENGINE_OVERHEAD_GIB) -> MemoryPlan:
    """Per-GPU memory of ``config`` (a ``RunConfig``) on ``gpus`` GPUs of ``gpu_memory_gib`` each.

    ``prompt_tokens``: prompt length (text + image tokens) assumed for the KV-cache demand.
    """
    shape = shape or model_shape(config.model)
    par, roll = config.parallel, config.rollout
    megatron = par.backend == "megatron"
    tp, pp, cp = ((par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.context_parallel_size)
                  if megatron else (1, 1, 1))
    if gpus % (tp * pp * cp):
        raise ValueError(f"{gpus} GPUs are not a multiple of TP x PP x CP = {tp * pp * cp}")
    dp = gpus // (tp * pp * cp)
    rollout_tp = roll.tensor_parallel_size if roll.engine == "sglang" else 1
    n = shape.params()
    wbytes = DTYPE_BYTES[config.model.dtype]
    shard = n / (tp * pp)

    weights = shard * wbytes
    if megatron:
        grads = shard * 4
        optimizer = shard * 12 / (dp * cp if par.use_distributed_optimizer else 1)
    else:
        grads = shard * wbytes
        optimizer = shard * 2 * wbytes
    uses_kl = (config.algorithm.defaults()["kl_coef"] or 0) > 0
    reference = 0.0 if (par.offload_reference_to_cpu or not uses_kl) else weights

    h, kv_dim, inter = shape.hidden, shape.kv_heads * shape.head_dim, shape.intermediate
    sp = megatron and par.sequence_parallel
    norm_elems = 2 * h
    other_elems = (h + 2 * kv_dim) + h + 3 * inter
    per_token_layer = 2 * ((norm_elems / tp if sp else norm_elems) + other_elems / tp)  # bf16
    tokens = config.train.micro_batch_tokens / cp
    layers_per_stage = shape.layers / pp
    if par.recompute == "full":
        stored = tokens * layers_per_stage * 2 * (h / tp if sp else h) + tokens * per_token_layer
    else:
        stored = tokens * layers_per_stage * per_token_layer
    activations = stored * (pp if pp > 1 else 1)
    logits = tokens * (shape.vocab / tp) * 4

    bucket = 2 * roll.weight_bucket_mb * 2 ** 20
    engine_weights = n / rollout_tp * wbytes
    static_pool = roll.mem_fraction_static * gpu_memory_gib * GIB
    kv_per_token = 2 * shape.layers * max(1, shape.kv_heads // rollout_tp) * shape.head_dim * 2
    kv_cache_tokens = max(0, int((static_pool - engine_weights) // kv_per_token))
    engines = max(1, gpus // rollout_tp)
    prompts_per_engine = -(-config.data.prompts_per_step // engines)
    demand = prompts_per_engine * roll.group_size * (prompt_tokens + roll.max_new_tokens)

    g = lambda b: b / GIB  # noqa: E731
    phases = {
        "generate": {"trainer context": trainer_overhead_gib, "engine static pool (weights + KV)": g(static_pool),
                     "engine runtime": engine_overhead_gib},
        "weight_sync": {"trainer context": trainer_overhead_gib, "trainer weights": g(weights),
                        "engine runtime": engine_overhead_gib, "engine weights": g(engine_weights),
                        "transfer buckets": g(bucket)},
        "train": {"trainer context": trainer_overhead_gib, "weights": g(weights), "gradients": g(grads),
                  "optimizer": g(optimizer), "reference": g(reference), "activations": g(activations),
                  "logits": g(logits), "engine runtime": engine_overhead_gib},
    }
    if roll.engine != "sglang":  # the HF engine shares the trainer's weights: no separate pool
        phases["generate"] = {"trainer context": trainer_overhead_gib, "weights": g(weights)}
        phases["weight_sync"] = {"trainer context": trainer_overhead_gib, "weights": g(weights)}
        phases["train"].pop("engine runtime")
        kv_cache_tokens = demand
    return MemoryPlan(gpu_memory_gib=gpu_memory_gib, gpus=gpus, params=n,
                      parallel={"tp": tp, "pp": pp, "cp": cp, "dp": dp, "rollout_tp": rollout_tp},
                      phases=phases, kv_cache_tokens=kv_cache_tokens, kv_cache_demand_tokens=demand)


def plan_as_dict(plan: MemoryPlan) -> dict:
    out = dataclasses.asdict(plan)
    out.update(peak_phase=plan.peak_phase, peak_gib=plan.peak_gib, fits=plan.fits)
    return out
