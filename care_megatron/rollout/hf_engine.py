"""Rollouts with transformers ``generate``: the CPU / small-GPU implementation of ``RolloutEngine``.

What a completion carries (spec section 1, 5):

* ``token_ids``: the generated tokens only (never the prompt, never an RGR prefix), up to and
  including the first stop token (eos / ``<|im_end|>``) when one was produced;
* ``logprobs``: the behaviour log-prob of each of those tokens **under the sampling distribution
  before truncation**: ``log_softmax(logits / T)[token]`` where ``T`` is the sampling temperature,
  or ``log_softmax(logits)`` when decoding greedily (``T == 0``). This is the convention SGLang
  follows by default (its log-probs are taken after temperature scaling, before top-k / top-p), so
  both engines report the same quantity. top-k / top-p truncation is *not* reflected: a trainer
  recomputing the log-prob with ``care_megatron.rollout.mismatch.logprob_temperature(T)`` gets the
  same number, which is what the importance ratio and the train/rollout mismatch metric need;
* ``finish_reason``: ``"stop"`` when a stop token ended the response, ``"length"`` at
  ``max_new_tokens``.

Batching: requests are left-padded into batches of ``batch_size``. Qwen-VL inputs are batched the
way the processor batches them: ``pixel_values`` of all images concatenated in request order,
``image_grid_thw`` stacked in the same order; transformers computes M-RoPE positions (and the
``rope_deltas`` used while decoding) from ``attention_mask``, so left padding does not shift them.

Decode path (``decode_path``): on CPU, ``"fast"`` (the default) runs the decoder's attention through
:func:`gqa_sdpa_attention` while ``generate`` runs: the same ``scaled_dot_product_attention`` call as
transformers' ``sdpa`` implementation, with the grouped K/V heads shared through SDPA's ``enable_gqa``
instead of materialising ``repeat_kv`` copies of the whole KV cache at every decoding step (the
largest single cost of CPU decoding with GQA). The kernel computes the same sums in the same order,
so completions and log-probs are bitwise those of ``"reference"`` (stock transformers; tested).
On CUDA the stock path is kept: there SDPA with a mask and ``enable_gqa`` falls back to its math kernel.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable

import torch

from care_megatron.rollout.base import Completion, GenerationRequest, SamplingParams, memory_tags
from care_megatron.rollout.mismatch import logprob_temperature

DECODE_PATHS = ("fast", "reference")
GQA_SDPA = "care_sdpa_gqa"
"""Name under which :func:`gqa_sdpa_attention` is registered with transformers' attention and mask interfaces."""

# Checkpoint (on-disk, SGLang, Megatron-export) names of Qwen-VL weights -> module names of the
# transformers>=5 classes, which nest the decoder under ``model.language_model`` and the vision tower
# under ``model.visual``. Applied only when a name is not already a module name.
_CHECKPOINT_TO_MODULE_PREFIXES = (
    ("model.layers.", "model.language_model.layers."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.norm.", "model.language_model.norm."),
    ("visual.", "model.visual."),
)


def checkpoint_name_to_module_name(name: str, module_names: set[str] | dict) -> str:
    """Map a Hugging-Face checkpoint weight name to the name of the same tensor in the loaded model.

    Names already present in ``module_names`` are returned unchanged, so both spellings work.
    """
    if name in module_names:
        return name
    for old, new in _CHECKPOINT_TO_MODULE_PREFIXES:
        if name.startswith(old):
            candidate = new + name[len(old):]
            if candidate in module_names:
                return candidate
    return name


def multimodal_token_types(input_ids: torch.Tensor, config: Any) -> torch.Tensor:
    """``mm_token_type_ids`` as the Qwen-VL processors build them: 1 on image pad tokens, 2 on
    video pad tokens, 0 elsewhere. Shape of ``input_ids`` (LongTensor[B, L]).

    transformers>=5 computes M-RoPE (3-D positions for image tokens, ``rope_deltas`` for decoding)
    only when this tensor is given; without it Qwen2.5-VL silently falls back to 1-D text positions
    and Qwen3-VL raises. The trainer's packed positions follow M-RoPE, so the engine must pass it.
    """
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    image_id, video_id = getattr(config, "image_token_id", None), getattr(config, "video_token_id", None)
    if image_id is not None:
        types[input_ids == image_id] = 1
    if video_id is not None:
        types[input_ids == video_id] = 2
    return types


def gqa_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                       is_causal=None, **kwargs):
    """transformers' ``sdpa_attention_forward`` (transformers 5.x) without the ``repeat_kv`` copies.

    Query [B, H, q, D], key / value [B, H_kv, kv, D]. Everything the stock function decides (the
    ``is_causal`` rule, the prefill slice of an empty static cache) is decided the same way; a
    position bias or differing K / V head sizes go to the stock function unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if groups <= 1 or kwargs.get("position_bias") is not None or key.shape[-1] != value.shape[-1]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    q_length = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(q_length > 1 and attention_mask is None and is_causal)
    if is_causal and key.shape[2] > q_length:
        key, value = key[:, :, :q_length], value[:, :, :q_length]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=is_causal,
        enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _register_gqa_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(GQA_SDPA, gqa_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GQA_SDPA, sdpa_mask)  # same masks as "sdpa"


@contextlib.contextmanager
def _decoder_attention(model: torch.nn.Module, implementation: str | None):
    """Run the text decoder with attention ``implementation`` (None: unchanged), restored afterwards."""
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    previous = text_config._attn_implementation
    if implementation is None or previous != "sdpa":
        yield
        return
    _register_gqa_sdpa()
    text_config._attn_implementation = implementation
    try:
        yield
    finally:
        text_config._attn_implementation = previous


class _BehaviourLogprobRecorder:
    """Logits processor that records ``log_softmax(raw_logits / T)`` of each sampled token.

    It also removes ``suppressed_token_ids`` from sampling (see ``HFRolloutEngine``).
    transformers applies user logits processors before its own temperature / top-k / top-p warpers,
    so ``scores`` here are the raw float32 logits of the step. The token sampled at step t is only
    known at step t+1 (it is the last column of ``input_ids`` then), so one [B, V] log-prob table is
    kept pending and gathered one call later: memory stays at one step, not the whole response.
    """

    def __init__(self, temperature: float, suppressed_token_ids: list[int]):
        self.temperature = temperature
        self.suppressed = suppressed_token_ids
        self.pending: torch.Tensor | None = None
        self.per_step: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.pending is not None:
            self.per_step.append(self.pending.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        if self.suppressed:
            # Recorded before suppression on purpose: the trainer's log-softmax runs over the full
            # vocabulary, so this is the number it reproduces; the two differ only by the mass the
            # policy puts on placeholder tokens, which is negligible for any trained model.
            scores = scores.clone()
            scores[:, self.suppressed] = float("-inf")
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """FloatTensor[B, steps]: log-prob of every generated column of ``sequences``."""
        if self.pending is not None:
            self.per_step.append(self.pending.gather(-1, sequences[:, -1:]).squeeze(-1))
            self.pending = None
        if not self.per_step:
            return torch.zeros(sequences.shape[0], 0)
        return torch.stack(self.per_step, dim=1).cpu()


class HFRolloutEngine:
    """``RolloutEngine`` on a transformers causal / vision-language model (e.g.
    ``Qwen2_5_VLForConditionalGeneration``).

    Args:
        model: the policy model; its parameters are updated in place by ``update_weights``.
        tokenizer: decodes completions to text (None: ``Completion.text`` is empty) and supplies the
            default stop tokens (``eos_token_id`` and ``<|im_end|>``) and the pad token.
        batch_size: requests per ``generate`` call (bounds memory; ``RolloutConfig.batch_size``).
        stop_token_ids: stop tokens always in force, in addition to ``SamplingParams.stop_token_ids``;
            None: the tokenizer's eos and ``<|im_end|>`` plus the model's generation-config eos.
        pad_token_id: id used for left padding; None: tokenizer pad, else model config pad, else
            the first stop token (it is masked out by ``attention_mask`` either way).
        device: where the model runs while awake; None: the device of its parameters.
        decode_path: ``"fast"`` or ``"reference"`` (see the module docstring; same results, the
            reference path is kept to measure the speed-up and test the equality).
        suppressed_token_ids: tokens never sampled; None: the model's vision placeholders
            (image / video pad, vision start / end). A sampled ``<|image_pad|>`` would make the
            trainer's forward pass treat it as an image slot and fail, so a response must not
            contain one. Their log-prob mass is still counted in ``Completion.logprobs``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any = None,
        *,
        batch_size: int = 64,
        stop_token_ids: Iterable[int] | None = None,
        pad_token_id: int | None = None,
        device: torch.device | str | None = None,
        suppressed_token_ids: Iterable[int] | None = None,
        decode_path: str = "fast",
    ):
        if batch_size < 1:
            raise ValueError(f"HFRolloutEngine.batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.stop_token_ids = list(stop_token_ids) if stop_token_ids is not None else self._default_stop_ids()
        if not self.stop_token_ids:
            raise ValueError("HFRolloutEngine: no stop token known; pass stop_token_ids or a tokenizer with an eos token")
        self.pad_token_id = pad_token_id if pad_token_id is not None else self._default_pad_id()
        if suppressed_token_ids is None:
            cfg = model.config
            names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
            suppressed_token_ids = [getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None]
        self.suppressed_token_ids = sorted(set(int(t) for t in suppressed_token_ids))
        self.released: set[str] = set()
        if decode_path not in DECODE_PATHS:
            raise ValueError(f"HFRolloutEngine.decode_path must be one of {DECODE_PATHS}, got {decode_path!r}")
        self.decode_path = decode_path
        self._closed = False

    # ------------------------------------------------------------------ set-up helpers
    def _default_stop_ids(self) -> list[int]:
        ids: list[int] = []
        tok = self.tokenizer
        if tok is not None:
            if getattr(tok, "eos_token_id", None) is not None:
                ids.append(int(tok.eos_token_id))
            im_end = tok.convert_tokens_to_ids("<|im_end|>") if hasattr(tok, "convert_tokens_to_ids") else None
            unk = getattr(tok, "unk_token_id", None)
            if isinstance(im_end, int) and im_end != unk:
                ids.append(im_end)
        gen_cfg = getattr(self.model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None)
        if eos is not None:
            ids.extend([eos] if isinstance(eos, int) else list(eos))
        return sorted(set(ids))

    def _default_pad_id(self) -> int:
        if self.tokenizer is not None and getattr(self.tokenizer, "pad_token_id", None) is not None:
            return int(self.tokenizer.pad_token_id)
        text_cfg = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        if getattr(text_cfg, "pad_token_id", None) is not None:
            return int(text_cfg.pad_token_id)
        return self.stop_token_ids[0]

    # ------------------------------------------------------------------ generation
    def generate(self, requests: list[GenerationRequest], sampling: SamplingParams) -> list[Completion]:
        """One completion per request, in request order (see the module docstring for the fields)."""
        if self._closed:
            raise RuntimeError("HFRolloutEngine.generate called after shutdown()")
        if self.asleep:
            raise RuntimeError("HFRolloutEngine.generate called while asleep; call wake() first")
        completions: list[Completion] = []
        for chunk_index, start in enumerate(range(0, len(requests), self.batch_size)):
            chunk = requests[start:start + self.batch_size]
            completions.extend(self._generate_batch(chunk, sampling, chunk_index))
        return completions

    @contextlib.contextmanager
    def _rng_scope(self, seed: int | None, chunk_index: int):
        """Seeded sampling without disturbing the caller's global RNG stream."""
        if seed is None:
            yield
            return
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            # Distinct, reproducible streams per chunk of batch_size requests.
            torch.manual_seed(seed + 1_000_003 * chunk_index)
            yield

    def build_batch(self, requests: list[GenerationRequest]) -> dict[str, torch.Tensor]:
        """Left-padded model inputs for ``requests``.

        Returns ``input_ids`` / ``attention_mask`` LongTensor[B, L] (L = longest prompt + prefix) and,
        when any request has images, ``pixel_values`` FloatTensor[sum P_i, C] and
        ``image_grid_thw`` LongTensor[n_images, 3] concatenated in request order, and
        ``mm_token_type_ids`` IntTensor[B, L] (see :func:`multimodal_token_types`).
        """
        sequences = [list(r.prompt_ids) + list(r.prefix_ids) for r in requests]
        for r, seq in zip(requests, sequences):
            if not seq:
                raise ValueError(f"request {r.request_id!r}: empty prompt_ids")
            if (r.pixel_values is None) != (r.image_grid_thw is None):
                raise ValueError(f"request {r.request_id!r}: pixel_values and image_grid_thw must be given together")
        longest = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        for row, seq in enumerate(sequences):
            input_ids[row, longest - len(seq):] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, longest - len(seq):] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        with_images = [r for r in requests if r.pixel_values is not None]
        if with_images:
            batch["pixel_values"] = torch.cat([r.pixel_values for r in with_images], dim=0)
            batch["image_grid_thw"] = torch.cat([r.image_grid_thw.reshape(-1, 3) for r in with_images], dim=0).long()
            batch["mm_token_type_ids"] = multimodal_token_types(input_ids, self.model.config)
        return batch

    def _generation_config(self, sampling: SamplingParams, stop_ids: list[int]):
        from transformers import GenerationConfig

        greedy = sampling.temperature == 0
        # Every knob that changes the distribution is set explicitly: generate() fills unset
        # values from the model's own generation_config, and released Qwen-VL checkpoints ship
        # top_k=1 / top_p=0.001 / repetition_penalty=1.05 there, which would silently change the
        # behaviour policy away from what SamplingParams says.
        return GenerationConfig(
            do_sample=not greedy,
            temperature=1.0 if greedy else float(sampling.temperature),
            top_p=1.0 if greedy else float(sampling.top_p),
            top_k=0 if (greedy or sampling.top_k <= 0) else int(sampling.top_k),
            min_p=None,
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            num_beams=1,
            num_return_sequences=1,
            min_new_tokens=0,
            max_new_tokens=int(sampling.max_new_tokens),
            eos_token_id=stop_ids,
            pad_token_id=self.pad_token_id,
            return_dict_in_generate=True,
            use_cache=True,
        )

    @torch.no_grad()
    def _generate_batch(self, requests: list[GenerationRequest], sampling: SamplingParams, chunk_index: int) -> list[Completion]:
        stop_ids = sorted(set(self.stop_token_ids) | set(sampling.stop_token_ids))
        batch = {k: v.to(self.device) for k, v in self.build_batch(requests).items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(next(self.model.parameters()).dtype)
        recorder = _BehaviourLogprobRecorder(logprob_temperature(sampling.temperature), self.suppressed_token_ids)
        from transformers import LogitsProcessorList

        was_training = self.model.training
        self.model.eval()
        fast = self.decode_path == "fast" and self.device.type == "cpu"
        try:
            with self._rng_scope(sampling.seed, chunk_index), _decoder_attention(self.model, GQA_SDPA if fast else None):
                out = self.model.generate(
                    **batch,
                    generation_config=self._generation_config(sampling, stop_ids),
                    logits_processor=LogitsProcessorList([recorder]),
                )
        finally:
            self.model.train(was_training)
        prompt_len = batch["input_ids"].shape[1]
        generated = out.sequences[:, prompt_len:].cpu()
        logprobs = recorder.finish(out.sequences)
        if logprobs.shape != generated.shape:
            raise RuntimeError(f"log-prob steps {tuple(logprobs.shape)} != generated tokens {tuple(generated.shape)}")
        stop_set = set(stop_ids)
        completions = []
        for row, request in enumerate(requests):
            tokens = generated[row].tolist()
            end, finish = len(tokens), "length"
            for i, tok in enumerate(tokens):
                if tok in stop_set:
                    end, finish = i + 1, "stop"
                    break
            tokens = tokens[:end]
            completions.append(
                Completion(
                    request_id=request.request_id,
                    token_ids=tokens,
                    text=self.decode(tokens, stop_set),
                    logprobs=logprobs[row, :end].tolist(),
                    finish_reason=finish,
                )
            )
        return completions

    def decode(self, token_ids: list[int], stop_ids: set[int] | None = None) -> str:
        """Text of a completion, the trailing stop token left out; special tokens such as
        ``<think>`` are kept, since the verifier reads the tags."""
        if self.tokenizer is None:
            return ""
        stop_ids = set(self.stop_token_ids) if stop_ids is None else stop_ids
        if token_ids and token_ids[-1] in stop_ids:
            token_ids = token_ids[:-1]
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    # ------------------------------------------------------------------ weights and memory
    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging-Face-named full tensors into the model in place (any subset, any order).

        Names may be module names (``model.language_model.layers.0...``) or checkpoint names
        (``model.layers.0...``, ``visual...``, as exported for SGLang). Unknown names and shape
        mismatches raise ``ValueError`` naming the tensor; dtype and device are converted.
        """
        params = dict(self.model.named_parameters())
        params.update(dict(self.model.named_buffers()))
        for name, tensor in named_tensors:
            target_name = checkpoint_name_to_module_name(name, params)
            target = params.get(target_name)
            if target is None:
                sample = ", ".join(sorted(params)[:5])
                raise ValueError(f"update_weights: unknown weight {name!r} (model names look like: {sample}, ...)")
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"update_weights: shape mismatch for {name!r}: engine has {tuple(target.shape)}, got {tuple(tensor.shape)}"
                )
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))

    def sleep(self, tags=None) -> None:
        """Release ``tags`` (``base.MEMORY_TAGS``; None: all). ``"weights"`` moves the model to CPU
        (on a CPU-only run this changes nothing) and frees cached accelerator memory; ``"kv_cache"``
        holds nothing between calls here (``generate`` allocates its cache per batch)."""
        todo = [t for t in memory_tags(tags) if t not in self.released]
        if "weights" in todo and self.device.type != "cpu":
            self.model.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.released.update(todo)

    def wake(self, tags=None) -> None:
        """Resume ``tags`` (None: all); ``"weights"`` moves the model back to its device."""
        todo = [t for t in memory_tags(tags) if t in self.released]
        if "weights" in todo and self.device.type != "cpu":
            self.model.to(self.device)
        self.released.difference_update(todo)

    @property
    def asleep(self) -> bool:
        """True while any memory is released (``generate`` needs all of it)."""
        return bool(self.released)

    def shutdown(self) -> None:
        self._closed = True
