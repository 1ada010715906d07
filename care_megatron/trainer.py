"""The RL loop. Each step is the data flow of ARCHITECTURE.md, one named call per arrow:

    prompts -> rollouts (G per prompt) -> verifier -> no-grad pass (old log-probs, <think> embeddings)
    -> advantages (anchor, hard negatives, rescue) -> RGR resample -> verifier -> packing + loss inputs
    -> reference pass -> update -> weight sync -> metrics / eval / checkpoint

Nothing here knows whether the backend is Megatron or plain PyTorch, or the engine SGLang or HF.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from pathlib import Path

import torch
import yaml

from care_megatron import checkpoint as ckpt
from care_megatron.algorithm.advantages import AdvantageInputs, get_advantage_fn
from care_megatron.algorithm.care import CareConfig
from care_megatron.algorithm.policy_losses import PolicyLossConfig, get_policy_loss
from care_megatron.config.schema import ConfigError, RunConfig
from care_megatron.data.dataset import PromptIterator, build_records
from care_megatron.data.images import run_image_pipeline
from care_megatron.data.packing import MRopeSpec, pack_sequences
from care_megatron.data.prompting import build_prompt, resolve_system_prompt
from care_megatron.evaluation.benchmark_eval import TrainingBenchmarkSubset
from care_megatron.evaluation.scoring import evaluate
from care_megatron.experience import (advantage_inputs, dapo_dynamic_sampling, generate_rollouts,
                                     reflect_hard_negatives, to_sequence)
from care_megatron.metrics import MetricsLogger, group_records, rl_step_metrics, write_group_records, write_samples
from care_megatron.rewards.registry import get_reward_fn
from care_megatron.rewards.verifier import VerifierConfig
from care_megatron.rollout.base import SamplingParams
from care_megatron.rollout.colocate import StepSchedule, sync_weights
from care_megatron.training.megatron.parallel_state import all_reduce_host_values
from care_megatron.runtime import (check_preemption, is_main_process, max_over_ranks, policy_model_config,
                                  seed_everything)
from care_megatron.training import step_inputs, updates
from care_megatron.training.update_norm import snapshot_parameters

log = logging.getLogger(__name__)

RL_PHASES = ("wake_rollout", "update_weights", "wake_rollout_kv", "generate", "sleep_rollout", "wake_trainer",
             "logprobs", "sleep_trainer_rgr", "wake_rollout_rgr", "update_weights_rgr", "wake_rollout_kv_rgr",
             "generate_rgr", "sleep_rollout_rgr", "wake_trainer_rgr",
             "logprobs_rgr", "reference_logprobs", "train", "sleep_trainer")
"""Colocated step order (issue 7), with CARE's RGR round trip (the engine is needed again after the
trainer's embedding pass picks the hard negatives) spelled out as its own phases. The engine wakes in
two parts: its weights, then (after the sync) its KV cache."""


def derive_seed(run_seed: int, step: int, dp_rank: int, stream: str, base: int = 0) -> int:
    """A 31-bit seed (small enough for every engine) for one random stream of one step on one
    data-parallel rank (``stream``: ``care`` for the random anchor / selector ablations, ``rgr`` for
    RGR's decoding), so every step draws afresh, ranks draw independently, and a resumed run draws
    what the uninterrupted one did."""
    key = f"{run_seed}/{base}/{step}/{dp_rank}/{stream}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 33


def _decoded_tokens(rollouts) -> float:
    """Response tokens the engine decoded for ``rollouts`` (an RGR sample's re-fed rationale prefix is prompt, not decoded)."""
    return float(sum(len(r.completion.token_ids) for r in rollouts))


class RLTrainer:
    def __init__(self, config: RunConfig, progress: bool = True):
        from care_megatron.models import build_model_and_processor
        from care_megatron.rollout.builder import build_rollout_engine
        from care_megatron.training.registry import build_backend

        self.config, cfg = config, config
        seed_everything(cfg.train.seed, cfg.train.threads)
        self.out = Path(cfg.train.output_dir)
        self.model, self.tokenizer, self.image_processor = build_model_and_processor(
            policy_model_config(cfg), min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
        self.image_pipeline = run_image_pipeline(cfg.data, self.image_processor)  # None = PIL in the processor
        self.system_prompt = resolve_system_prompt(cfg.data.system_prompt, cfg.data.tag_config)  # data.think_tag
        self.mrope = MRopeSpec.from_hf_config(self.model.config)
        self.backend = build_backend(cfg, self.model)  # initialises torch.distributed for Megatron
        self.main = is_main_process()
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        if cfg.rollout.engine == "sglang":  # SGLang sizes its KV pool from the memory the trainer leaves free;
            self.backend.sleep()             # the first step's rollout phase expects the trainer asleep anyway
        self.engine = build_rollout_engine(cfg, self.model, self.tokenizer)
        self.data = build_records(cfg.data)
        self.benchmark_subset = TrainingBenchmarkSubset.from_config(cfg)  # eval.train_subset; None = off
        self.prompts = PromptIterator(self.data.train, cfg.data.prompts_per_step, seed=cfg.data.seed)
        algo = cfg.algorithm
        self.method = algo.name
        self.care_config = CareConfig(**algo.care)
        self.advantage_fn = get_advantage_fn(algo.name)
        self.loss_config = PolicyLossConfig.for_method(algo.name, algo.clip_low, algo.clip_high, algo.kl_coef,
                                                       algo.kl_estimator, algo.entropy_coef,
                                                       dual_clip=algo.dual_clip, kl_clamp=algo.kl_clamp)
        self.loss_fn = step_inputs.make_loss_fn(get_policy_loss(algo.name), self.loss_config, algo.name,
                                                self.care_config.think_weight_pos,
                                                think_weight_neg=self.care_config.think_weight_neg)
        self.reward_fn = functools.partial(get_reward_fn("verifier"), config=VerifierConfig(
            format_weight=algo.format_weight, tags=cfg.data.tag_config))  # data.think_tag: also the regions' tags
        stops = list(getattr(self.engine, "stop_token_ids", []))
        self.sampling = dict(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                             max_new_tokens=cfg.rollout.max_new_tokens, stop_token_ids=stops)
        self.schedule = StepSchedule(phases=RL_PHASES)
        self.progress = progress
        self.bad_steps = 0
        self.start_step = 0
        self.skipped_records = 0
        self.dp_rank = int(getattr(self.backend, "data_parallel_rank", 0))
        self.dp_size = int(getattr(self.backend, "data_parallel_size", 1))
        if cfg.data.prompts_per_step % self.dp_size:
            raise ConfigError("data.prompts_per_step", f"{cfg.data.prompts_per_step} is not divisible by the "
                              f"data-parallel size {self.dp_size}")
        per_update = cfg.train.prompts_per_update or cfg.data.prompts_per_step
        if per_update % self.dp_size:
            raise ConfigError("train.prompts_per_update", f"{per_update} prompts per update do not split evenly "
                              f"over the data-parallel size {self.dp_size}")
        self.updates_per_epoch = cfg.data.prompts_per_step // per_update

    # ---------------------------------------------------------------- one RL step
    def step(self, step: int) -> dict[str, float]:
        cfg, s = self.config, self.schedule
        # data-parallel ranks sample different prompts with independent streams (rank 0 keeps the
        # single-process seed; the ranks of one TP / CP group share a DP rank, so their rollouts agree)
        sampling = SamplingParams(**self.sampling, seed=cfg.train.seed * 1_000_003 + step + self.dp_rank * 10_000_019)
        # the random anchor / selector ablations and RGR's decoding draw fresh per step and rank
        care_config = dataclasses.replace(self.care_config, seed=derive_seed(
            cfg.train.seed, step, self.dp_rank, "care", base=self.care_config.seed))
        s.begin_step()
        records, prompts = self.build_prompts(next(self.prompts)[self.dp_rank::self.dp_size])
        self.rollout_phase(s, "")
        with s.phase("generate"):
            rollouts = generate_rollouts(self.engine, records, prompts, cfg.rollout.group_size, sampling,
                                         self.tokenizer, self.reward_fn, step)
            decoded = {"tokens/decoded": _decoded_tokens(rollouts), "tokens/rgr_decoded": 0.0}
            extra: dict[str, float] = {}
            if self.method == "dapo":
                rollouts, extra, refilled = self.dapo_refill(rollouts, sampling, step)
                decoded["tokens/decoded"] += refilled  # refills count though filtered groups are dropped
        self.trainer_phase(s, "")
        sequences = [to_sequence(r, i) for i, r in enumerate(rollouts)]
        with s.phase("logprobs"):
            packed = self.pack(sequences)
            outputs = self.backend.forward_logprobs(packed, with_think_embeddings=True)
            old = step_inputs.per_sequence_logprobs(packed, outputs)
            embeddings = step_inputs.per_sequence_embeddings(packed, outputs)
        advantages, info = self.advantages(rollouts, embeddings, care_config)
        targets = [int(t) for t in info["rgr_target"].tolist() if t >= 0] if self.method == "care" and cfg.algorithm.rgr else []
        if targets:  # RGR (spec section 5): training only, in anchored groups with a hard negative
            rgr_sampling = dataclasses.replace(sampling, seed=derive_seed(cfg.train.seed, step, self.dp_rank, "rgr"))
            reflected = self.rgr_round_trip(s, rollouts, targets, rgr_sampling, step)
            decoded["tokens/rgr_decoded"] = _decoded_tokens(reflected)
            decoded["tokens/decoded"] += decoded["tokens/rgr_decoded"]
            new = [to_sequence(r, len(rollouts) + i) for i, r in enumerate(reflected)]
            with s.phase("logprobs_rgr"):
                packed_new = self.pack(new)
                out_new = self.backend.forward_logprobs(packed_new, with_think_embeddings=True)
                old += step_inputs.per_sequence_logprobs(packed_new, out_new)
                embeddings = torch.cat([embeddings, step_inputs.per_sequence_embeddings(packed_new, out_new)])
            rollouts, sequences = rollouts + reflected, sequences + new
            advantages, info = self.advantages(rollouts, embeddings, care_config)
        for seq, lp in zip(sequences, old):
            seq.token_fields["old_logprobs"] = lp.float()
        dp_group = getattr(self.backend, "data_parallel_group", None) if self.dp_size > 1 else None
        groups = [r.group for r in rollouts]  # mini-batches of whole prompt groups, one optimizer update each
        count = updates.minibatch_count(len(set(groups)), self.updates_per_epoch, dp_group)
        minibatches = [updates.pack_minibatch(sequences, run, self.pack)
                       for run in updates.minibatch_sequences(groups, count)]
        packed = [mb for run in minibatches for mb in run]
        positive = torch.tensor([r.correct for r in rollouts])
        mismatch = step_inputs.attach_loss_inputs(
            packed, self.method, advantages, positive, self.care_config.think_weight_pos,
            cfg.rollout.max_new_tokens, cfg.rollout.tis_cap, group=dp_group,
            think_weight_neg=self.care_config.think_weight_neg)
        if self.loss_config.kl_coef > 0:
            with s.phase("reference_logprobs"):
                for mb, out in zip(packed, self.backend.forward_logprobs(packed, model="reference")):
                    mb.token_fields["ref_logprobs"] = out.logprobs.detach().cpu()
        normalisers = [step_inputs.reduce_normalisers(step_inputs.loss_normalisers(run, cfg.rollout.max_new_tokens),
                                                      dp_group) for run in minibatches]
        with s.phase("train"):
            before = snapshot_parameters(self.backend)  # update/param_norm: the step's whole parameter change
            result = updates.run_updates(self.backend, minibatches, normalisers, self.loss_fn, cfg.train.ppo_epochs)
            update_norm = {} if before is None else {"update/param_norm": before.distance()}
            del before
        with s.phase("sleep_trainer"):
            self.backend.sleep()
        timings = s.end_step()
        if self.main:
            write_samples(self.out / "samples.jsonl", step, rollouts)
        metrics, payload = rl_step_metrics(rollouts, advantages, info if self.method == "care" else None, result,
                                           group=dp_group, with_payload=True)
        if self.main:  # per-group records beside metrics.jsonl (numbered like it: this step is step + 1)
            write_group_records(self.out / "groups.jsonl", group_records(payload, step + 1, self.method))
        decoded = dict(zip(decoded, all_reduce_host_values(list(decoded.values()), dp_group).tolist()))
        return {**metrics, **extra, **mismatch, **timings, **update_norm, **decoded,
                "data/skipped_records": float(self.skipped_records)}

    def dapo_refill(self, rollouts, sampling, step: int):
        """DAPO's dynamic sampling with this rank's refills: the kept rollouts, the ``dapo/*`` metrics and the
        tokens the refills decoded."""
        cfg = self.config
        refilled = [0.0]

        def more(num_prompts: int, group_offset: int):
            records, prompts = self.build_prompts(next(self.prompts)[self.dp_rank::self.dp_size][:num_prompts])
            fresh = generate_rollouts(self.engine, records, prompts, cfg.rollout.group_size, sampling, self.tokenizer,
                                      self.reward_fn, step, group_offset=group_offset)
            refilled[0] += _decoded_tokens(fresh)
            return fresh

        kept, extra = dapo_dynamic_sampling(rollouts, more, cfg.data.prompts_per_step // self.dp_size,
                                            cfg.rollout.max_new_tokens, cfg.algorithm.dapo_overlong_buffer,
                                            cfg.algorithm.dapo_overlong_penalty)
        if self.dp_size > 1:  # every rank draws as many batches as the rank that refilled most: streams stay aligned
            rounds = int(extra["dapo/refill_rounds"])
            for _ in range(int(max_over_ranks(rounds, self.backend.data_parallel_group)) - rounds):
                next(self.prompts)
        return kept, extra, refilled[0]

    def rollout_phase(self, s: StepSchedule, suffix: str) -> None:
        """Wake the engine's weights, give it the trainer's current weights, then wake its KV cache
        (colocated order, issue 7): the KV cache is not allocated while weight buckets are in flight,
        and a slept SGLang engine has lost its weights, so every wake is followed by a sync."""
        with s.phase("wake_rollout" + suffix):
            self.engine.wake(tags=("weights",))
        with s.phase("update_weights" + suffix):
            sync_weights(self.backend, self.engine, self.config.rollout.weight_bucket_mb << 20)
        with s.phase("wake_rollout_kv" + suffix):
            self.engine.wake(tags=("kv_cache",))

    def rgr_round_trip(self, s: StepSchedule, rollouts, targets, sampling, step: int):
        """The engine again for RGR: trainer off, engine on with the (unchanged) weights re-sent
        (SGLang freed them at the last sleep), resample the hard negatives, engine off, trainer on."""
        with s.phase("sleep_trainer_rgr"):
            self.backend.sleep()
        self.rollout_phase(s, "_rgr")
        with s.phase("generate_rgr"):
            reflected = reflect_hard_negatives(self.engine, rollouts, targets, sampling, self.tokenizer,
                                               self.reward_fn, step, mode=self.config.algorithm.rgr_mode)
        self.trainer_phase(s, "_rgr")
        return reflected

    def trainer_phase(self, s: StepSchedule, suffix: str) -> None:
        with s.phase("sleep_rollout" + suffix):
            self.engine.sleep()
        with s.phase("wake_trainer" + suffix):
            self.backend.wake()

    def build_prompts(self, records):
        """Prompts of ``records``; a record whose image cannot be decoded is skipped and counted."""
        kept, prompts = [], []
        for record in records:
            try:
                prompts.append(build_prompt(record.question, record.images, self.tokenizer, self.image_processor,
                                            system_prompt=self.system_prompt, image_pipeline=self.image_pipeline))
                kept.append(record)
            except (OSError, ValueError, TypeError) as exc:
                self.skipped_records += 1
                log.warning("skipping record %s: %s", record.id, exc)
        if not kept:
            raise RuntimeError("every record of this step was unreadable; check the data (see the warnings above)")
        return kept, prompts

    def pack(self, sequences):
        return pack_sequences(sequences, self.config.train.micro_batch_tokens, mrope=self.mrope,
                              pad_multiple=int(getattr(self.backend, "pack_multiple", 1)),
                              pad_token_id=self.tokenizer.pad_token_id or 0)

    def advantages(self, rollouts, embeddings, care_config: CareConfig | None = None):
        inputs = AdvantageInputs(**advantage_inputs(rollouts, embeddings))
        return self.advantage_fn(inputs, care_config or self.care_config)

    # ---------------------------------------------------------------- evaluation / checkpoints
    def evaluate(self) -> dict[str, float]:
        greedy = SamplingParams(temperature=0.0, max_new_tokens=self.config.rollout.max_new_tokens,
                                stop_token_ids=self.sampling["stop_token_ids"])
        # same order as a step's rollout phase: weights, sync, then the KV cache (peak memory)
        self.engine.wake(tags=("weights",))
        sync_weights(self.backend, self.engine, self.config.rollout.weight_bucket_mb << 20)
        self.engine.wake(tags=("kv_cache",))
        metrics = self._score_heldout(self.data.eval, greedy).as_metrics()
        if self.config.eval.samples:
            metrics.update(self.evaluate_sampled(self.config.eval.samples))
        if self.benchmark_subset is not None:
            metrics.update(self.benchmark_subset.metrics(self.engine, self.tokenizer, self.image_processor, greedy))
        self.engine.sleep()
        return metrics

    def evaluate_sampled(self, n: int) -> dict[str, float]:
        """mean@n on the held-out split: n draws per question at the rollout's sampling settings, one
        fixed seed (common random numbers across evaluations); ``eval_sampled/*`` metrics."""
        sampling = SamplingParams(**self.sampling, seed=derive_seed(self.config.train.seed, 0, 0, "eval_sampled"))
        records = [record for record in self.data.eval for _ in range(n)]
        return self._score_heldout(records, sampling, keep_samples=0).as_metrics(prefix="eval_sampled/")

    def _score_heldout(self, records, sampling: SamplingParams, **kwargs):
        """Decode ``records`` with the awake engine and score them with the run's verifier, prompts and images."""
        return evaluate(self.engine, records, self.tokenizer, self.image_processor, self.reward_fn, sampling,
                        batch_size=self.config.rollout.batch_size, image_pipeline=self.image_pipeline,
                        system_prompt=self.system_prompt, **kwargs)

    def save(self, step: int) -> Path:
        state = {"data": self.prompts.state_dict(), "bad_steps": self.bad_steps}
        return ckpt.save_checkpoint(self.out / "checkpoints", step, self.backend, state, self.config.train.keep_last)

    def resume(self) -> None:
        """Continue from the newest usable checkpoint (an incomplete or damaged newest one is passed
        over with a warning; none usable is a ConfigError naming ``train.output_dir``)."""
        found = ckpt.load_latest_checkpoint(self.out / "checkpoints", self.backend)
        if found is None:
            log.info("--resume: no checkpoint in %s, starting fresh", self.out / "checkpoints")
            return
        latest, state = found
        self.prompts.load_state_dict(state["data"])
        self.bad_steps, self.start_step = state["bad_steps"], state["step"]
        log.info("resumed from %s at step %d", latest, self.start_step)

    # ---------------------------------------------------------------- the loop
    def run(self) -> dict[str, float]:
        cfg = self.config.train
        logger = MetricsLogger(self.out, total_steps=cfg.steps, start_step=self.start_step, desc=self.method,
                               progress=self.progress and self.main, resumed=self.start_step > 0, enabled=self.main)
        last: dict[str, float] = {}
        step = self.start_step
        try:
            if step == 0 and self.data.eval:
                logger.log(0, self.evaluate(), advance=False)
            for step in range(self.start_step, cfg.steps):
                check_preemption()  # Slurm's warning signal: checkpoint (below) at this step boundary and exit
                metrics = self.step(step)
                self.bad_steps = self.bad_steps + 1 if metrics["skipped"] else 0
                if self.bad_steps >= cfg.max_consecutive_bad_steps:
                    raise RuntimeError(f"{self.bad_steps} consecutive steps with non-finite loss or gradient; stopping")
                done = step + 1
                if self.data.eval and cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                    metrics.update(self.evaluate())
                logger.log(done, metrics)
                if done % cfg.save_every == 0 or done == cfg.steps:
                    self.save(done)
                last = metrics
        except KeyboardInterrupt:
            log.warning("interrupted: writing a checkpoint at step %d before exiting", step)
            self.save(step)
            raise
        finally:
            logger.close()
        self.save_final_policy()
        from care_megatron.plotting import plot_run

        if self.main:
            plot_run(self.out / "metrics.jsonl", self.out / "curves.png")
        return last

    def save_final_policy(self) -> None:
        """The trained policy as a Hugging Face directory (``<output_dir>/final``), loadable by
        ``from_pretrained``, ``care-eval --checkpoint`` and SGLang; filled through the weight export."""
        from care_megatron.sft import save_backend_policy

        save_backend_policy(self.backend, self.model, self.tokenizer, self.out / "final")


def train(config: RunConfig, resume: bool = False, progress: bool = True) -> dict[str, float]:
    trainer = RLTrainer(config, progress=progress)
    if resume:
        trainer.resume()
    return trainer.run()
