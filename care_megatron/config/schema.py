"""Typed run configuration: one dataclass per concern, every field documented and validated.

A run is described by :class:`RunConfig` (model, parallel, rollout, algorithm, data, train). YAML
files fill it; ``section.field=value`` command-line overrides patch it (see ``loader.py``). Every
cross-field check raises ``ValueError`` naming the field, so a bad config fails before any work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

ALGORITHMS = ("care", "grpo", "dapo", "gspo", "dr_grpo", "rloo")
RGR_MODES = ("repair", "resample", "fresh")
EVAL_PROTOCOLS = ("greedy", "paper")


class ConfigError(ValueError):
    """A configuration value that cannot work, found at load time or later in the run (an unknown
    task, a path that does not exist, a checkpoint folder with nothing usable). It carries the field
    so the command line can end the run with one line naming the field and the fix (exit status 2)
    instead of a traceback; a ValueError, so callers that catch those keep working."""

    def __init__(self, field: str, message: str):
        super().__init__(f"config field '{field}': {message}")
        self.field, self.problem = field, message

    def __reduce__(self):  # rebuilt from both arguments when pickled (multiprocessing, collectives)
        return type(self), (self.field, self.problem)


def _check(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ConfigError(name, message)


@dataclass
class ModelConfig:
    name: str = "tiny_qwen2_5_vl"
    """Model to train: a registry name (``tiny_qwen2_5_vl``, ``tiny_qwen3_vl``, ...) or a local
    Hugging Face directory. Registry tiny models are built from a config with random (seeded) weights."""
    arch: str = "qwen2_5_vl"
    """Architecture family: ``qwen2_5_vl`` or ``qwen3_vl``; picks the processor, M-RoPE variant and weight mapping."""
    tokenizer: str = "tiny"
    """``tiny`` (the committed ~1.5k-token BPE tokenizer) or a directory holding a Hugging Face tokenizer."""
    dtype: str = "float32"
    """Parameter / compute dtype: float32 on CPU (bf16 matmuls are slow there), bfloat16 on GPU."""
    attn_implementation: str = "sdpa"
    """transformers attention for the plain-PyTorch backend and HF rollout engine: ``sdpa`` or ``eager``."""
    init_seed: int = 0
    """Seed of the random initialisation of registry tiny models."""

    def __post_init__(self) -> None:
        _check(self.arch in ("qwen2_5_vl", "qwen3_vl"), "model.arch", f"must be qwen2_5_vl or qwen3_vl, got {self.arch!r}")
        _check(self.dtype in ("float32", "bfloat16", "float16"), "model.dtype", f"unknown dtype {self.dtype!r}")
        _check(self.attn_implementation in ("sdpa", "eager"), "model.attn_implementation", "must be sdpa or eager")


FP8_RECIPES = ("tensorwise", "delayed", "blockwise", "mxfp8")
"""``parallel.fp8_recipe`` values: megatron-core's ``TransformerConfig.fp8_recipe`` names (TE's
``Float8CurrentScaling``, ``DelayedScaling``, ``Float8BlockScaling``, ``MXFP8BlockScaling``)."""


@dataclass
class ParallelConfig:
    backend: str = "torch"
    """Training backend: ``torch`` (plain PyTorch, one process) or ``megatron`` (Megatron-Core)."""
    tensor_model_parallel_size: int = 1
    """Tensor-parallel degree (Megatron). Must divide the attention heads and KV heads."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel degree (Megatron). Must divide the number of decoder layers (or use uneven placement)."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Interleaved pipeline stages per rank (None = no interleaving)."""
    context_parallel_size: int = 1
    """Context-parallel degree: every packed sequence split over this many ranks (Megatron's
    load-balanced 2*CP-chunk layout; sequences are padded to a multiple of 2*CP). For long rollouts."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tensor_model_parallel_size > 1)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state across data-parallel ranks (Megatron distributed optimizer)."""
    transformer_impl: str = "auto"
    """Layer implementation: ``transformer_engine``, ``local`` (SDPA / flex attention), or ``auto``
    (Transformer Engine when it imports, else local)."""
    fp8: Optional[str] = None
    """FP8 recipe through Transformer Engine: None, ``hybrid`` or ``e4m3``."""
    fp8_recipe: str = "tensorwise"
    """FP8 scaling recipe (megatron-core names): ``tensorwise`` (per-tensor current scaling),
    ``delayed`` (amax history), ``blockwise``, ``mxfp8`` (Blackwell only)."""
    fp8_first_last_bf16: bool = True
    """Keep the first and last decoder layers in bf16 under FP8 (the usual stability choice; not
    with the ``delayed`` recipe, which megatron-core refuses to combine with it)."""
    recompute: Optional[str] = None
    """Activation recomputation: None, ``selective`` or ``full``."""
    offload_reference_to_cpu: bool = False
    """Keep the frozen reference model on CPU between uses (frees accelerator memory)."""

    def __post_init__(self) -> None:
        _check(self.backend in ("torch", "megatron"), "parallel.backend", f"must be torch or megatron, got {self.backend!r}")
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
            _check(getattr(self, name) >= 1, f"parallel.{name}", "must be >= 1")
        _check(self.transformer_impl in ("auto", "transformer_engine", "local"), "parallel.transformer_impl",
               "must be auto, transformer_engine or local")
        _check(self.fp8 in (None, "hybrid", "e4m3"), "parallel.fp8", "must be null, hybrid or e4m3")
        _check(not (self.fp8 and self.transformer_impl == "local"), "parallel.fp8", "FP8 needs transformer_impl auto or transformer_engine")
        _check(self.fp8_recipe in FP8_RECIPES, "parallel.fp8_recipe", "must be " + ", ".join(FP8_RECIPES[:-1])
               + " or " + FP8_RECIPES[-1])
        _check(not (self.fp8 and self.fp8_recipe == "delayed" and self.fp8_first_last_bf16), "parallel.fp8_first_last_bf16",
               "the delayed FP8 recipe cannot keep the first / last layers in bf16; use fp8_recipe=tensorwise or set it false")
        _check(not (self.sequence_parallel and self.tensor_model_parallel_size == 1), "parallel.sequence_parallel",
               "needs tensor_model_parallel_size > 1")
        _check(self.recompute in (None, "selective", "full"), "parallel.recompute", "must be null, selective or full")
        if self.backend == "torch":
            _check(self.tensor_model_parallel_size == self.pipeline_model_parallel_size == self.context_parallel_size == 1,
                   "parallel.backend", "the torch backend runs without model parallelism; use backend=megatron")


@dataclass
class RolloutConfig:
    engine: str = "hf"
    """Rollout engine: ``hf`` (transformers generate) or ``sglang`` (needs the [sglang] extra and a GPU)."""
    group_size: int = 8
    """G: rollouts sampled per prompt."""
    temperature: float = 1.0
    """Sampling temperature (0 = greedy; RL wants exploration, so 1.0)."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_k: int = -1
    """Top-k (-1 = off)."""
    max_new_tokens: int = 64
    """Response length cap in tokens."""
    batch_size: int = 64
    """Requests per generate call of the HF engine (bounds memory)."""
    tensor_parallel_size: int = 1
    """SGLang rollout TP size (engines per node = GPUs / this)."""
    mem_fraction_static: float = 0.5
    """SGLang static memory fraction (weights + KV cache) when colocated with training."""
    weight_bucket_mb: int = 512
    """Size of weight-sync buckets from trainer to engine, in MiB (peak extra memory is two buckets)."""
    tis_cap: Optional[float] = None
    """Truncated importance sampling: cap on exp(logp_train - logp_rollout) per token (None = off)."""

    def __post_init__(self) -> None:
        _check(self.engine in ("hf", "sglang"), "rollout.engine", f"must be hf or sglang, got {self.engine!r}")
        # every method (ALGORITHMS) scores a rollout against the other rollouts of its prompt: with
        # one rollout per prompt every advantage is 0 and the run would train on nothing, silently
        _check(self.group_size >= 2, "rollout.group_size",
               f"got {self.group_size}; every method here ({', '.join(ALGORITHMS)}) compares the rollouts of one "
               f"prompt with each other, so a group of 1 gives every advantage 0; set it to 2 or more (default 8)")
        _check(self.temperature >= 0, "rollout.temperature", "must be >= 0")
        _check(0 < self.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
        _check(self.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
        _check(0 < self.mem_fraction_static < 1, "rollout.mem_fraction_static", "must be in (0, 1)")
        _check(self.weight_bucket_mb >= 1, "rollout.weight_bucket_mb", "must be >= 1")
        _check(self.tis_cap is None or self.tis_cap >= 1, "rollout.tis_cap", "must be null or >= 1")


@dataclass
class AlgorithmConfig:
    name: str = "care"
    """Advantage estimator and loss recipe: care, grpo, dapo, gspo, dr_grpo or rloo (spec section 7)."""
    clip_low: Optional[float] = None
    """Lower clip epsilon of the ratio; None = the method's default (care/dapo 0.2, gspo 3e-4, ...)."""
    clip_high: Optional[float] = None
    """Upper clip epsilon; None = the method's default (care/dapo 0.28, grpo 0.2, gspo 4e-4)."""
    kl_coef: Optional[float] = None
    """KL coefficient beta; None = the method's default (0.02, or 0 for dapo/gspo)."""
    kl_estimator: str = "k3"
    """KL estimator: k1, k2 or k3."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (0 = off)."""
    format_weight: float = 0.1
    """w_fmt: weight of the format reward in the overall reward."""
    rgr: bool = True
    """Reflection-Guided Resampling (CARE only; spec section 5)."""
    rgr_mode: str = "repair"
    """What RGR decodes for the chosen hard negative (paper section 4.3 controls): ``repair`` (its
    rationale + the repair cue, the method), ``resample`` (the same truncated rationale continued
    with no cue) or ``fresh`` (a new rollout of the prompt). The result is used the same way."""
    dual_clip: float = 3.0
    """c of the dual clip on negative-advantage tokens of every token-level clipped loss (0 disables)."""
    kl_clamp: Optional[float] = 10.0
    """Bound of the per-token k3 KL value (null disables)."""
    care: dict[str, Any] = field(default_factory=dict)
    """Overrides of ``care_megatron.algorithm.care.CareConfig`` fields (k, preselect_m, neg_scale,
    reflect_neg_scale, equalize, rescue, anchor_rule, negative_selector, think_weight_pos,
    think_weight_neg, ...)."""
    dapo_overlong_buffer: int = 16
    """DAPO soft overlong penalty: tokens before max_new_tokens where the penalty ramps in."""
    dapo_overlong_penalty: float = 1.0
    """DAPO soft overlong penalty at the length cap."""

    def __post_init__(self) -> None:
        _check(self.name in ALGORITHMS, "algorithm.name", f"unknown algorithm {self.name!r}; valid: {', '.join(ALGORITHMS)}")
        _check(self.kl_estimator in ("k1", "k2", "k3"), "algorithm.kl_estimator", "must be k1, k2 or k3")
        _check(0 <= self.format_weight <= 1, "algorithm.format_weight", "must be in [0, 1]")
        for name in ("clip_low", "clip_high", "kl_coef"):
            v = getattr(self, name)
            _check(v is None or v >= 0, f"algorithm.{name}", "must be null or >= 0")
        _check(self.rgr_mode in RGR_MODES, "algorithm.rgr_mode", f"must be one of {', '.join(RGR_MODES)}, got {self.rgr_mode!r}")
        _check(self.dual_clip == 0 or self.dual_clip > 1, "algorithm.dual_clip", f"must be 0 (off) or > 1, got {self.dual_clip!r}")
        _check(self.kl_clamp is None or self.kl_clamp > 0, "algorithm.kl_clamp", f"must be null (off) or > 0, got {self.kl_clamp!r}")
        if self.care:
            from care_megatron.algorithm.care import CareConfig  # validates names and values

            try:
                CareConfig(**self.care)
            except TypeError as exc:
                raise ValueError(f"config field 'algorithm.care': {exc}") from exc

    def defaults(self) -> dict[str, float]:
        """Clip / KL values in force, the method's defaults filled in (spec section 7)."""
        from care_megatron.algorithm.policy_losses import METHOD_DEFAULTS

        table = METHOD_DEFAULTS[self.name]
        return {
            "clip_low": table[0] if self.clip_low is None else self.clip_low,
            "clip_high": table[1] if self.clip_high is None else self.clip_high,
            "kl_coef": table[2] if self.kl_coef is None else self.kl_coef,
        }


@dataclass
class DataConfig:
    tasks: list[str] = field(default_factory=lambda: ["count_shapes", "tallest_bar", "triangle_angle", "compare_lengths", "easy_vqa"])
    """Task sources: synthetic task names, ``easy_vqa``, or ``jsonl:<path>`` for a unified-schema file."""
    train_size: int = 2000
    """Records drawn for training (synthetic tasks are generated with the seed)."""
    eval_size: int = 64
    """Held-out records for evaluation (disjoint seeds from training)."""
    eval_tasks: list[str] = field(default_factory=list)
    """Where held-out records come from, spelled like ``tasks`` (e.g. ``jsonl:<out>/heldout.jsonl`` written
    by ``tools/prepare_data.py``); ``tasks`` then give training records only. Empty: set aside from ``tasks``."""
    sft_tasks: list[str] = field(default_factory=list)
    """Cold-start SFT sources, spelled like ``tasks`` plus ``sharegpt:<path>`` (LLaVA / ShareGPT conversations,
    e.g. Vision-R1-cold); records need a rationale. Empty: the rationale-bearing training records of ``tasks``."""
    difficulty: list[int] = field(default_factory=lambda: [1, 2])
    """Difficulty levels of the synthetic tasks to mix."""
    image_size: int = 56
    """Side of rendered synthetic images, in pixels."""
    min_pixels: int = 56 * 56
    """Processor minimum pixels per image (resize rule)."""
    max_pixels: int = 56 * 56
    """Processor maximum pixels per image (resize rule)."""
    image_backend: str = "pil"
    """Image decoding: ``pil`` (CPU) or ``dali`` (GPU decode, needs the [dali] extra)."""
    prompts_per_step: int = 8
    """Prompts per RL step (each sampled G times)."""
    system_prompt: Optional[str] = None
    """System turn of every SFT / RL / held-out prompt. None: the package's instruction for ``think_tag``
    (``care_megatron.data.prompting.system_prompt_for``: asks for the ``<think>``/``<answer>`` layout,
    or ``<reasoning>``/``<answer>``); ``""``: no system turn; any other text: that text."""
    think_tag: str = "think"
    """Tag of the rationale span: ``think`` (``<think>...</think>``) or ``reasoning``
    (``<reasoning>...</reasoning>``, what the CARE paper's appendix 8.2 uses for Qwen3-VL-8B). One
    switch for the whole run: the default system prompt, the SFT targets, the format reward, the
    token regions (CARE's think weights, think embeddings, ``length/think_mean``), the RGR prefix and
    the evaluations (``care_megatron.rewards.parsing.tags_for``)."""
    seed: int = 0
    """Data order / generation seed."""

    def __post_init__(self) -> None:
        _check(len(self.tasks) > 0, "data.tasks", "must name at least one task")
        _check(self.train_size >= 1 and self.eval_size >= 0, "data.train_size", "must be >= 1 (eval_size >= 0)")
        _check(self.image_backend in ("pil", "dali"), "data.image_backend", "must be pil or dali")
        _check(0 < self.min_pixels <= self.max_pixels, "data.min_pixels", "must be > 0 and <= max_pixels")
        _check(self.prompts_per_step >= 1, "data.prompts_per_step", "must be >= 1")
        from care_megatron.rewards.parsing import THINK_TAGS

        _check(self.think_tag in THINK_TAGS, "data.think_tag",
               f"must be one of {', '.join(THINK_TAGS)}, got {self.think_tag!r}")
        if self.system_prompt:  # a custom instruction must ask for the tag the run grades
            other = [f"<{name}>" for name in THINK_TAGS if name != self.think_tag and f"<{name}>" in self.system_prompt]
            if other and f"<{self.think_tag}>" not in self.system_prompt:
                raise ConfigError("data.system_prompt", f"asks for {other[0]} but data.think_tag is {self.think_tag!r}: "
                                  f"the format reward would score every response that follows it 0; write "
                                  f"<{self.think_tag}> in it or set data.think_tag")

    @property
    def tag_config(self):
        """The :class:`~care_megatron.rewards.parsing.TagConfig` of ``think_tag``."""
        from care_megatron.rewards.parsing import tags_for

        return tags_for(self.think_tag)


@dataclass
class TrainConfig:
    steps: int = 30
    """RL optimizer steps."""
    lr: float = 1e-4
    """Peak learning rate of the RL phase."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warm-up, in optimizer updates (``prompts_per_step / prompts_per_update x ppo_epochs`` per
    RL step), then constant."""
    prompts_per_update: Optional[int] = None
    """Prompts per optimizer update (mini-batch), counted over all data-parallel ranks; None = all of
    ``data.prompts_per_step`` (one update per RL step). Each RL step computes advantages, behaviour
    (old) and reference log-probs once, then splits its prompt groups, in order, into
    ``prompts_per_step / prompts_per_update`` mini-batches of whole groups (RGR samples and DAPO
    refills travel with their group) and takes one optimizer step per mini-batch, so from the second
    update on the importance ratio differs from 1 and the clips act (verl ``ppo_mini_batch_size``,
    EasyR1: 512 prompts per rollout step, 128 per update). Must divide ``data.prompts_per_step``
    and be divisible by the data-parallel size."""
    ppo_epochs: int = 1
    """Passes over the step's mini-batches (verl ``ppo_epochs``); updates per RL step =
    ``prompts_per_step / prompts_per_update x ppo_epochs``."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    micro_batch_tokens: int = 4096
    """Token budget of one packed (THD) micro-batch."""
    group_by_length: bool = True
    """Torch backend: run a micro-batch's sequences through the model in groups of similar length
    instead of one batch padded to the longest (RGR's reflection prompts are about twice as long as
    the rest). The same results up to floating-point summation order; the Megatron backend runs
    THD-packed sequences unpadded and ignores it."""
    sft_steps: int = 150
    """Cold-start SFT optimizer steps (``care-sft``)."""
    sft_lr: float = 3e-3
    """SFT learning rate."""
    sft_batch_size: int = 16
    """SFT examples per step."""
    sft_save_every: int = 0
    """care-sft checkpoint every N steps into ``<output_dir>/sft_checkpoints`` (0 = only when interrupted);
    ``care-sft --resume`` continues from the newest. ``keep_last`` of them are kept."""
    output_dir: str = "runs/tiny_cpu"
    """Where metrics, TensorBoard events, plots, samples and checkpoints go."""
    init_from: Optional[str] = None
    """Checkpoint directory to initialise the policy from (e.g. the SFT output); None = model.name's weights."""
    save_every: int = 10
    """Checkpoint every N steps (and at the end)."""
    keep_last: int = 2
    """Checkpoints kept on disk."""
    eval_every: int = 10
    """Held-out evaluation every N steps (0 = only at the end)."""
    max_consecutive_bad_steps: int = 5
    """Stop after this many NaN/inf steps in a row (each is skipped with a warning)."""
    seed: int = 0
    """Global seed (torch, python, numpy, sampling)."""
    threads: int = 0
    """torch intra-op threads (0 = leave the default)."""

    def __post_init__(self) -> None:
        _check(self.steps >= 0, "train.steps", "must be >= 0")
        _check(self.lr > 0, "train.lr", "must be > 0")
        _check(self.micro_batch_tokens >= 16, "train.micro_batch_tokens", "must be >= 16")
        _check(self.keep_last >= 1, "train.keep_last", "must be >= 1")
        _check(self.save_every >= 1, "train.save_every", "must be >= 1")
        _check(self.sft_save_every >= 0, "train.sft_save_every", "must be >= 0 (0 = only when interrupted)")
        _check(self.max_consecutive_bad_steps >= 1, "train.max_consecutive_bad_steps", "must be >= 1")
        _check(self.prompts_per_update is None or self.prompts_per_update >= 1, "train.prompts_per_update",
               "must be >= 1 or null")
        _check(self.ppo_epochs >= 1, "train.ppo_epochs", "must be >= 1")


@dataclass
class EvalConfig:
    benchmarks: dict[str, str] = field(default_factory=dict)
    """Benchmark name -> local dataset directory (or parquet file) for ``care-eval``; names in
    ``care_megatron.evaluation.benchmarks.BENCHMARKS``. Empty = evaluate ``data.tasks``' held-out split."""
    limit: Optional[int] = None
    """First N usable examples of each benchmark (None = all)."""
    output_dir: Optional[str] = None
    """Per-example JSONL, summary, table and chart (None = ``<train.output_dir>/eval``); re-runs resume here."""
    max_new_tokens: Optional[int] = None
    """Response budget of each benchmark decode (None = ``rollout.max_new_tokens``)."""
    judge: Optional[str] = None
    """``package.module:function(question, key, extracted) -> score`` grading open-ended answers (off by default)."""
    published_base: str = "auto"
    """Which of the paper's base models' Table 1 rows to print beside ours (``auto``: matched from the model name)."""
    label: str = "ours"
    """Name of our row in the table and chart."""
    train_subset: int = 0
    """Training-time evaluation: the first N usable examples of each ``eval.benchmarks`` entry, scored
    greedily at every ``train.eval_every`` as ``bench/<name>`` metrics (0 = off)."""
    samples: int = 0
    """Training-time held-out evaluation: besides the greedy decode (``eval/*``), decode N samples per
    question at the rollout's temperature / top-p / top-k with a fixed seed and report their mean
    accuracy as ``eval_sampled/*`` (mean@N, the accuracy of the policy RL samples from; the same seed at
    every evaluation, so two evaluations differ by the policy, not the draw). 0 = greedy only."""
    protocol: str = "greedy"
    """How ``care-eval`` decodes: ``greedy`` (one greedy decode per example) or ``paper`` (the paper's
    reporting: ``eval.seeds`` decodes per example at the rollout's temperature / top-p / top-k, each seed
    index with its own sampling seed derived from ``train.seed``; accuracy is the mean over seeds, with a
    95% Student-t interval over the per-seed accuracies beside the bootstrap interval over examples). The
    training-time evaluations (``eval/*``, ``eval_sampled/*``, ``bench/*``) are not affected."""
    seeds: int = 5
    """Decodes per example under ``eval.protocol: paper`` (the paper reports five seeds); unused by ``greedy``."""

    def __post_init__(self) -> None:
        if self.benchmarks:
            from care_megatron.evaluation.benchmarks import BENCHMARKS

            unknown = sorted(set(self.benchmarks) - set(BENCHMARKS))
            _check(not unknown, "eval.benchmarks", f"unknown benchmark(s) {unknown}; valid: {', '.join(BENCHMARKS)}")
        _check(self.limit is None or self.limit >= 1, "eval.limit", "must be >= 1 or null")
        _check(self.max_new_tokens is None or self.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1 or null")
        _check(self.train_subset >= 0, "eval.train_subset", "must be >= 0")
        _check(self.samples >= 0, "eval.samples", "must be >= 0")
        _check(self.protocol in EVAL_PROTOCOLS, "eval.protocol",
               f"must be {' or '.join(EVAL_PROTOCOLS)}, got {self.protocol!r}")
        _check(isinstance(self.seeds, int) and not isinstance(self.seeds, bool) and self.seeds >= 1, "eval.seeds",
               f"must be an integer >= 1, got {self.seeds!r}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        per_update = self.train.prompts_per_update
        _check(per_update is None or self.data.prompts_per_step % per_update == 0, "train.prompts_per_update",
               f"{per_update} does not divide data.prompts_per_step ({self.data.prompts_per_step}) into whole "
               f"updates; set a divisor of it (null: one update per step)")
        if self.algorithm.name == "dapo":
            _check(self.algorithm.dapo_overlong_buffer <= self.rollout.max_new_tokens, "algorithm.dapo_overlong_buffer",
                   f"must be <= rollout.max_new_tokens ({self.rollout.max_new_tokens})")
        _check(self.algorithm.dapo_overlong_buffer >= 0, "algorithm.dapo_overlong_buffer", "must be >= 0")
        # SGLang 0.5.23 picks FlashAttention-3 on Hopper (model_override_base.py), which has no fp32 kernels
        _check(not (self.rollout.engine == "sglang" and self.model.dtype == "float32"), "model.dtype",
               "float32 cannot run on rollout.engine=sglang (its default attention kernels take bfloat16 / "
               "float16 only); use model.dtype=bfloat16")
