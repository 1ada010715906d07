"""Cold-start SFT: teach the output format on reference rationales before RL (spec section 9).

Each record with a ``rationale`` becomes ``<think>{rationale}</think><answer>{answer}</answer><|im_end|>``
after its prompt (``<reasoning>...</reasoning>`` with ``data.think_tag: reasoning``); the loss is the
token-mean negative log-likelihood over those response tokens.
It runs through the same training backend, packing and checkpoint code as RL.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from care_megatron.config.schema import ConfigError, RunConfig
from care_megatron.data.batch import PackedMicroBatch
from care_megatron.data.packing import pack_sequences
from care_megatron.data.prompting import IM_END, SYSTEM_PROMPT, build_prompt, build_sequence, resolve_system_prompt
from care_megatron.metrics import MetricsLogger
from care_megatron.rewards.parsing import DEFAULT_TAGS, TagConfig, parse_response, token_char_offsets, token_regions
from care_megatron.training.base import ForwardOutputs

log = logging.getLogger(__name__)


def sft_response_text(record, tags: TagConfig = DEFAULT_TAGS) -> str:
    """The reference response: the rationale in ``tags``' rationale span, then the answer span."""
    answer = record.answer
    if record.answer_type == "multiple_choice" and record.choices:
        answer = record.answer  # the option letter is the verifiable answer
    return f"{tags.think_open}{record.rationale}{tags.think_close}{tags.answer_open}{answer}{tags.answer_close}"


def sft_sequence(record, tokenizer, image_processor, index: int, image_pipeline=None,
                 system_prompt: str | None = SYSTEM_PROMPT, tags: TagConfig = DEFAULT_TAGS):
    """Prompt + reference response as a training Sequence (loss on the response and its stop token).
    ``tags``: ``data.think_tag``'s (``config.data.tag_config``); pass the matching ``system_prompt``."""
    prompt = build_prompt(record.question, record.images, tokenizer, image_processor, system_prompt=system_prompt,
                          image_pipeline=image_pipeline)
    text = sft_response_text(record, tags)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    regions = token_regions(token_char_offsets(ids, tokenizer), parse_response(text, tags))
    stop = tokenizer.convert_tokens_to_ids(IM_END)
    regions = torch.cat([regions, torch.zeros(1, dtype=torch.long)])
    return build_sequence(prompt, list(ids) + [stop], regions, sequence_id=index)


def nll_loss_fn(outputs: ForwardOutputs, mb: PackedMicroBatch, normalisers: dict):
    """Sum of response-token NLL divided by the global response-token count (micro-batch invariant)."""
    mask = mb.loss_mask.to(outputs.logprobs.dtype)
    loss = -(outputs.logprobs * mask).sum() / normalisers["num_tokens"]
    return loss, {"sft/nll_sum": float(-(outputs.logprobs.detach() * mask).sum())}


def save_policy(model, tokenizer, out: Path) -> None:
    """Hugging Face directory (safetensors weights, config, tokenizer): ``train.init_from`` and
    ``from_pretrained`` both load it."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def save_backend_policy(backend, hf_model, tokenizer, out: Path) -> None:
    """Write the backend's current policy as a Hugging Face directory, through the weight export
    (the path rollouts use), so it works for any backend (Megatron shards are gathered). Collective
    under torch.distributed; rank 0 writes."""
    from care_megatron.rollout.hf_engine import checkpoint_name_to_module_name
    from care_megatron.runtime import is_main_process

    names = set(hf_model.state_dict())
    state = {checkpoint_name_to_module_name(name, names): t for bucket in backend.export_weights() for name, t in bucket}
    if is_main_process():
        hf_model.load_state_dict(state)
        save_policy(hf_model, tokenizer, Path(out))


SFT_SUBDIR = "sft"
"""Folder of ``train.output_dir`` that ``care-sft`` writes its policy (and metrics) to."""


def sft_output_dir(config: RunConfig) -> Path:
    """Where ``care-sft`` with ``config`` saves its policy: ``<train.output_dir>/sft``, the directory an RL
    run's ``train.init_from`` names to start from it (the recipes' RL configs point at their SFT recipe's)."""
    return Path(config.train.output_dir) / SFT_SUBDIR


def drop_overlong(seqs: list, capacity: int) -> tuple[list, int]:
    """``(kept, dropped)``: the sequences of at most ``capacity`` tokens, in order, and how many were longer.

    SFT data (long reasoning chains, e.g. Vision-R1-cold) can hold a conversation longer than one packed
    micro-batch; it is left out of its step (counted in ``sft/skipped_too_long``) rather than truncated,
    which would cut its ``<answer>``, or ending the run at that step."""
    kept = [s for s in seqs if len(s) <= capacity]
    return kept, len(seqs) - len(kept)


def sft_checkpoint_dir(config: RunConfig) -> Path:
    """Where care-sft keeps its checkpoints: ``<train.output_dir>/sft_checkpoints`` (beside the policy in ``sft/``)."""
    return Path(config.train.output_dir) / "sft_checkpoints"


def run_sft(config: RunConfig, progress: bool = True, resume: bool = False) -> Path:
    """Train ``config.train.sft_steps`` steps of SFT; save the policy under :func:`sft_output_dir`; return that path.

    A checkpoint (model, optimizer, data order, every rank's RNG) is written to :func:`sft_checkpoint_dir`
    every ``train.sft_save_every`` steps (0: none) and when the run is interrupted (Ctrl-C, or a preemption
    signal caught at a step boundary); ``resume`` continues from the newest usable one, so the resumed run
    trains what the uninterrupted one would have. Metrics are logged by finished-step count (1, 2, ...)."""
    from care_megatron import checkpoint as ckpt
    from care_megatron.runtime import check_preemption
    from care_megatron.data.dataset import PromptIterator, build_sft_records
    from care_megatron.data.packing import MRopeSpec
    from care_megatron.models import build_model_and_processor
    from care_megatron.training.registry import build_backend
    from care_megatron.runtime import seed_everything

    seed_everything(config.train.seed, config.train.threads)
    out = sft_output_dir(config)
    model, tokenizer, image_processor = build_model_and_processor(
        config.model, min_pixels=config.data.min_pixels, max_pixels=config.data.max_pixels)
    backend = build_backend(config, model, lr=config.train.sft_lr, keep_reference=False)
    from care_megatron.data.images import run_image_pipeline

    image_pipeline = run_image_pipeline(config.data, image_processor)  # None = PIL in the processor
    tags = config.data.tag_config  # data.think_tag
    system_prompt = resolve_system_prompt(config.data.system_prompt, tags)
    records, reports = build_sft_records(config.data)
    for report in reports:
        if report.num_skipped:  # malformed rows are skipped, never fatal: say how many and why
            log.warning("SFT data %s", report.summary())
    if not records:
        raise ConfigError("data.sft_tasks", "no record has a reference rationale (SFT needs the synthetic "
                                            "tasks, easy_vqa or sharegpt:<path> conversations with reasoning)")
    batches = PromptIterator(records, config.train.sft_batch_size, seed=config.train.seed)
    from care_megatron.runtime import is_main_process

    main = is_main_process()
    start = 0
    if resume:
        found = ckpt.load_latest_checkpoint(sft_checkpoint_dir(config), backend)
        if found is None:
            log.info("--resume: no SFT checkpoint in %s, starting fresh", sft_checkpoint_dir(config))
        else:
            path, state = found
            batches.load_state_dict(state["data"])
            start = int(state["step"])
            log.info("resumed SFT from %s at step %d", path, start)

    def save(done: int) -> None:
        ckpt.save_checkpoint(sft_checkpoint_dir(config), done, backend, {"data": batches.state_dict()},
                             config.train.keep_last)

    logger = MetricsLogger(out, total_steps=config.train.sft_steps, start_step=start, desc="sft",
                           progress=progress and main, enabled=main, resumed=start > 0)
    # data parallelism: every rank draws the same batch and trains on its slice; the normaliser is
    # the whole batch's token count, so the gradients summed over DP are the full batch's
    dp_rank = int(getattr(backend, "data_parallel_rank", 0))
    dp_size = int(getattr(backend, "data_parallel_size", 1))
    if config.train.sft_batch_size % dp_size:
        raise ConfigError("train.sft_batch_size", f"{config.train.sft_batch_size} is not divisible by "
                                                  f"the data-parallel size {dp_size}; use a multiple of it")
    pad_multiple = int(getattr(backend, "pack_multiple", 1))
    capacity = config.train.micro_batch_tokens - config.train.micro_batch_tokens % pad_multiple
    mrope = MRopeSpec.from_hf_config(model.config)
    step = start
    try:
        for step in range(start, config.train.sft_steps):
            check_preemption()  # a scheduler's warning signal: checkpoint (below) at this step boundary and exit
            done = step + 1  # metrics are numbered by finished steps, as in RL
            if config.train.sft_save_every and step > start and step % config.train.sft_save_every == 0:
                save(step)  # every sft_save_every finished steps (the last one needs none: the policy is saved)
            batch = next(batches)
            seqs = [sft_sequence(r, tokenizer, image_processor, i, image_pipeline, system_prompt, tags)
                    for i, r in enumerate(batch)]
            # the same batch on every rank, so every rank drops the same sequences (and skips the same steps)
            seqs, too_long = drop_overlong(seqs, capacity)
            if too_long:
                log.warning("SFT step %d: %d of %d examples are longer than train.micro_batch_tokens (%d tokens) "
                            "and are left out", done, too_long, len(batch), capacity)
            if not seqs:
                logger.log(done, {"sft/skipped_too_long": too_long, "skipped": 1})
                continue
            num_tokens = sum(int(s.loss_mask.sum()) for s in seqs)
            micro = pack_sequences(seqs[dp_rank::dp_size], config.train.micro_batch_tokens, pad_multiple=pad_multiple,
                                   mrope=mrope)
            result = backend.train_step(micro, nll_loss_fn, {"num_tokens": num_tokens})
            nll = result.metrics.get("sft/nll_sum", float("nan")) / max(num_tokens, 1)
            logger.log(done, {"loss": result.loss, "sft/token_nll": nll, "sft/perplexity": math.exp(min(nll, 50)),
                              "grad_norm": result.grad_norm, "lr": result.learning_rate, "skipped": result.skipped,
                              "sft/skipped_too_long": too_long})
    except KeyboardInterrupt:
        log.warning("interrupted: writing an SFT checkpoint at step %d before exiting", step)
        save(step)
        raise
    finally:
        logger.close()
    save_backend_policy(backend, model, tokenizer, out)
    if main:
        log.info("SFT done: policy saved to %s", out)
    return out
