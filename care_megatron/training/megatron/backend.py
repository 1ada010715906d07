"""``MegatronBackend``: the ``TrainingBackend`` protocol on Megatron-Core (TP / PP / DP / CP).

Same contract as the plain-PyTorch backend (``care_megatron/training/base.py``), so the RL loop does
not change. Two execution paths, chosen at start and logged:

* **GPU** - the policy wrapped in Megatron DDP (``calculate_per_token_loss=True`` so gradients are
  SUMMED over micro-batches and data-parallel ranks, the loss contract), Megatron's (distributed)
  optimizer, and ``get_forward_backward_func()`` schedules (1F1B / interleaved for PP).
* **CPU** (gloo) - Megatron's DDP, optimizer and schedules allocate CUDA buffers, so: a manual
  micro-batch loop, explicit gradient all-reduce over DP x CP (sum) and over TP for the replicated
  vision tower (mean), ``torch.optim.AdamW`` with a TP-aware global-norm clip. Under pipeline
  parallelism the micro-batches go through Megatron's own schedules (p2p over gloo) and the
  gradients are reduced explicitly afterwards, tied embeddings over the embedding group included.

Context parallelism (``parallel.context_parallel_size``): the ranks of a CP group read the same
micro-batches; each runs its load-balanced chunks of every sequence through the decoder
(``context_parallel.py``), the log-probs are all-gathered so every CP rank evaluates the same loss,
and gradients are summed over DP x CP (Megatron DDP's ``dp_cp`` group on GPU).

Weights come from a Hugging Face state dict through the shared mapping
(``care_megatron.models.weight_mapping.hf_to_megatron_state_dicts``, names documented in ``model_provider.py``), or a
custom converter ``(hf_state, hf_config, tp_size, tp_rank, padded_vocab) -> rank state dict``.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from care_megatron.algorithm.policy_losses import combine_loss_metrics
from care_megatron.config.schema import ParallelConfig, TrainConfig
from care_megatron.data.batch import PackedMicroBatch
from care_megatron.training.base import ForwardOutputs, LossFn, StepResult
from care_megatron.training.megatron import checkpoint as ckpt
from care_megatron.training.megatron.host_offload import HostOffloader
from care_megatron.training.megatron.model_provider import QwenVLMegatronModel, shared_mapping_state_dict, text_facts_from_hf
from care_megatron.training.megatron.optimizer import CpuOptimizer, MegatronOptimizerAdapter, learning_rate_at
from care_megatron.training.megatron.packed_forward import (ForwardOptions, context_parallel_layout, forward_hidden,
                                                            logprobs_from_hidden, packed_forward)
from care_megatron.training.megatron.parallel_state import all_reduce_host_values, initialize_parallel

log = logging.getLogger(__name__)

Converter = Callable[[dict, object, int, int, int], dict]


@dataclass
class MegatronBackendOptions:
    """Backend knobs that are not part of the run config."""

    logprob_chunk_tokens: int = 2048
    """Tokens per chunk of the fused output-layer log-softmax (fp32 logits memory = chunk * V/tp * 4 B)."""
    train_with_entropy: bool = True
    """Compute per-token entropy in ``train_step`` forwards (the loss may use it for an entropy bonus)."""
    force_cpu: bool = False
    """Run the CPU path even when CUDA is available (tests)."""
    temperature: float = 1.0
    """Log-probs are of softmax(logits / temperature) (the rollout sampling temperature, as the torch backend)."""

    def __post_init__(self) -> None:
        if self.logprob_chunk_tokens < 1:
            raise ValueError("MegatronBackendOptions.logprob_chunk_tokens must be >= 1")
        if not self.temperature > 0:
            raise ValueError("MegatronBackendOptions.temperature must be > 0 (greedy rollouts: use 1.0)")


class MegatronBackend:
    """A Megatron-Core policy + frozen reference implementing ``TrainingBackend``."""

    def __init__(self, hf_config, hf_state_dict: dict, *, parallel: ParallelConfig, train: TrainConfig,
                 arch: str = "qwen2_5_vl", dtype: torch.dtype = torch.float32, seed: int = 0,
                 options: MegatronBackendOptions | None = None, state_dict_converter: Converter | None = None,
                 with_reference: bool = True):
        if parallel.backend != "megatron":
            raise ValueError("config field 'parallel.backend': MegatronBackend needs backend=megatron")
        self.options = options or MegatronBackendOptions()
        self.parallel, self.train, self.dtype = parallel, train, dtype
        self.hf_config = hf_config  # weight export reads the architecture / dims from it
        self.dist = initialize_parallel(parallel, seed=seed, force_cpu=self.options.force_cpu)
        self.device = self.dist["device"]
        self.cpu_path = self.dist["cpu"]
        self.facts = text_facts_from_hf(hf_config, arch)
        # virtual pipeline: this rank holds one model chunk per virtual stage (chunk v = model stage
        # v * PP + pp_rank); otherwise one chunk. ``policy`` is chunk 0 (the vision tower on stage 0).
        self.vp_size = parallel.virtual_pipeline_model_parallel_size if self.dist["pp_size"] > 1 else None
        if self.vp_size and state_dict_converter is not None:
            raise ValueError("state_dict_converter does not support virtual pipeline stages; use the shared mapping")
        self.policy_chunks = self._build_chunks(hf_config)
        self.policy = self.policy_chunks[0]
        for vp_stage, chunk in enumerate(self.policy_chunks):
            if state_dict_converter is not None:
                rank_state = state_dict_converter(hf_state_dict, hf_config, self.dist["tp_size"], self.dist["tp_rank"],
                                                  chunk.padded_vocab_size)
            else:  # the shared mapping, one source of truth with weight export
                rank_state = shared_mapping_state_dict(hf_state_dict, hf_config, tp=self.dist["tp_size"],
                                                       tp_rank=self.dist["tp_rank"], pp=self.dist["pp_size"],
                                                       pp_rank=self.dist["pp_rank"], vp=self.vp_size, vp_stage=vp_stage,
                                                       impl=chunk.impl, padded_vocab=chunk.padded_vocab_size)
            missing, unexpected = chunk.load_state_dict(rank_state, strict=False)
            missing = [k for k in missing if not k.endswith("_extra_state")]
            if missing or unexpected:
                raise ValueError(f"weight conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.reference = None
        self.reference_chunks: list = []
        if with_reference:
            # a second instance rather than deepcopy: Megatron modules hold process-group handles
            self.reference_chunks = [chunk.eval() for chunk in self._build_chunks(hf_config)]
            for ref, chunk in zip(self.reference_chunks, self.policy_chunks):
                ref.load_state_dict(chunk.state_dict())
                for p in ref.parameters():
                    p.requires_grad_(False)
                if parallel.offload_reference_to_cpu:
                    ref.to("cpu")
            self.reference = self.reference_chunks[0]
        self.step_count = 0
        self._sleeping = None  # the HostOffloader while asleep
        self._host_offloader = HostOffloader()  # one exactly sized host buffer, reused by every sleep
        if self.cpu_path:
            from megatron.core import parallel_state as mps

            self.model = list(self.policy_chunks)
            self.optimizer = CpuOptimizer(self._policy_parameters(), lr=train.lr, weight_decay=train.weight_decay,
                                          clip=train.grad_clip, tp_group=mps.get_tensor_model_parallel_group(),
                                          tp_rank=self.dist["tp_rank"],
                                          dp_group=mps.get_data_parallel_group(with_context_parallel=True),
                                          norm_group=mps.get_model_parallel_group())
        else:
            self.model = self._wrap_ddp(self.policy_chunks)
            self.optimizer = MegatronOptimizerAdapter(self.model, dtype, train.lr, train.weight_decay,
                                                      train.grad_clip, parallel.use_distributed_optimizer)
            install_loss_scaling(self.policy_chunks, self.optimizer.optimizer)
        log.info("MegatronBackend: %s path, TP=%d PP=%d%s CP=%d DP=%d, layers=%s, optimizer=%s",
                 "CPU" if self.cpu_path else "GPU", self.dist["tp_size"], self.dist["pp_size"],
                 f" (VP={self.vp_size})" if self.vp_size else "", self.dist["cp_size"],
                 self.dist["dp_size"], self.policy.impl, self.optimizer.name)

    @classmethod
    def from_run_config(cls, config, model, *, lr: float | None = None, keep_reference: bool = True,
                        state_dict_converter: Converter | None = None) -> "MegatronBackend":
        """Build from a :class:`RunConfig` and a transformers Qwen-VL model (weights copied, model not kept).

        ``lr`` overrides ``config.train.lr`` (SFT); the log-prob temperature is ``config.rollout.temperature``
        (0 = greedy is treated as 1.0, as sampling at temperature 0 has no proper distribution).
        """
        import dataclasses

        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        train = config.train if lr is None else dataclasses.replace(config.train, lr=lr)
        temperature = config.rollout.temperature if config.rollout.temperature > 0 else 1.0
        return cls(model.config, model.state_dict(), parallel=config.parallel, train=train, arch=config.model.arch,
                   dtype=dtypes[config.model.dtype], seed=config.train.seed,
                   options=MegatronBackendOptions(temperature=temperature),
                   state_dict_converter=state_dict_converter, with_reference=keep_reference)

    # ------------------------------------------------------------------ data parallelism (read by trainer.py)
    @property
    def data_parallel_rank(self) -> int:
        return self.dist["dp_rank"]

    @property
    def data_parallel_size(self) -> int:
        return self.dist["dp_size"]

    @property
    def pack_multiple(self) -> int:
        """Packed micro-batch lengths must be a multiple of this (TP under sequence parallelism, times
        the FP8 GEMM alignment under FP8; the context-parallel layout pads per sequence itself)."""
        from care_megatron.training.megatron.te import packed_token_multiple

        return packed_token_multiple(self.dist["tp_size"], self.parallel.sequence_parallel,
                                     self.policy.config.fp8_recipe if self.policy.config.fp8 else None)

    @property
    def data_parallel_group(self):
        from megatron.core import parallel_state as mps

        return mps.get_data_parallel_group()

    def owned_parameters(self):
        """For ``update/param_norm``: this rank's trainable policy parameters, each unique parameter once
        over model parallelism (a tensor-parallel duplicate such as a norm or the replicated vision tower
        counts on TP rank 0 only; a shared (tied) embedding copy not at all, as in Megatron's gradient-norm
        clipping), and the model-parallel group over which their squared changes add up (None without
        model parallelism)."""
        from megatron.core import parallel_state as mps
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
        from megatron.core.transformer.module import param_is_not_shared

        owned = [p for p in self._policy_parameters() if p.requires_grad and param_is_not_shared(p)
                 and param_is_not_tensor_parallel_duplicate(p)]
        model_parallel = self.dist["tp_size"] * self.dist["pp_size"] > 1
        return owned, mps.get_model_parallel_group() if model_parallel else None

    # ------------------------------------------------------------------ construction helpers
    def _build_chunks(self, hf_config) -> list[QwenVLMegatronModel]:
        """This rank's model chunks: one, or one per virtual pipeline stage."""
        from megatron.core import parallel_state as mps

        from care_megatron.training.megatron import cpu_compat

        chunks = []
        for vp_stage in range(self.vp_size or 1):
            stage = dict(ignore_virtual=False, vp_stage=vp_stage) if self.vp_size else {}
            with cpu_compat.model_construction():
                chunks.append(QwenVLMegatronModel(hf_config, self.facts, self.parallel, self.dtype,
                                                  use_cpu_initialization=self.cpu_path,
                                                  pre_process=mps.is_pipeline_first_stage(**stage),
                                                  post_process=mps.is_pipeline_last_stage(**stage),
                                                  vp_stage=vp_stage if self.vp_size else None).to(self.device))
        for chunk in chunks:  # read by Megatron's schedules (policy and reference alike)
            chunk.config.calculate_per_token_loss = True  # no 1/num_microbatches, no 1/dp: gradients are summed
            chunk.config.variable_seq_lengths = True      # packed lengths differ per micro-batch
        return chunks

    def _policy_parameters(self):
        return [p for chunk in self.policy_chunks for p in chunk.parameters()]

    def _wrap_ddp(self, chunks: list) -> list:
        """Megatron DDP around each model chunk (bucketing on the first only, as Megatron-LM does for
        virtual stages); the schedule's ``no_sync_func`` is per chunk when there are several."""
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=self.parallel.use_distributed_optimizer,
                                                   average_in_collective=False)
        wrapped = []
        for index, chunk in enumerate(chunks):
            wrapped.append(DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                                   disable_bucketing=index > 0))
        no_sync = [ddp.no_sync for ddp in wrapped]
        for chunk in chunks:
            chunk.config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
            chunk.config.finalize_model_grads_func = self._finalize_grads_gpu
        return wrapped

    def _finalize_grads_gpu(self, model_chunks, num_tokens=None, *args, **kwargs):
        from megatron.core.distributed import finalize_model_grads

        # DP sum, SP norms, tied embeddings over PP. The replicated vision tower is not reduced over
        # TP: every TP rank runs it on the same pixels and receives the same full feature gradient
        # (sequence parallelism's scatter all-gathers it back), so its gradients are already equal,
        # as for Megatron's own replicated norms without sequence parallelism.
        finalize_model_grads(model_chunks, num_tokens=None)

    # ------------------------------------------------------------------ protocol: forward
    def _chunks(self, name: str) -> list:
        if name == "policy":
            return self.policy_chunks
        if name == "reference":
            if self.reference is None:
                raise ValueError("this MegatronBackend was built with with_reference=False")
            return self.reference_chunks
        raise ValueError(f"model must be 'policy' or 'reference', got {name!r}")

    @torch.no_grad()
    def forward_logprobs(self, micro_batches: list[PackedMicroBatch], *, model: str = "policy",
                         with_entropy: bool = False, with_think_embeddings: bool = False) -> list[ForwardOutputs]:
        chunks = self._chunks(model)
        offloaded = model == "reference" and self.parallel.offload_reference_to_cpu
        if offloaded:
            for chunk in chunks:
                chunk.to(self.device)
        was_training = chunks[0].training
        for chunk in chunks:
            chunk.eval()
        options = ForwardOptions(with_entropy=with_entropy, with_think_embeddings=with_think_embeddings,
                                 logprob_chunk_tokens=self.options.logprob_chunk_tokens,
                                 temperature=self.options.temperature)
        try:
            if self.dist["pp_size"] > 1:
                outputs = self._pipeline_forward_only(chunks, micro_batches, options)
            else:
                outputs = []
                for mb in micro_batches:
                    out = packed_forward(chunks[0], mb.to(self.device), options)
                    outputs.append(_detach_to_cpu(out))
        finally:
            for chunk in chunks:
                chunk.train(was_training)
                if offloaded:
                    chunk.to("cpu")
        return outputs

    def _run_schedule(self, chunks: list, micro_batches: list[PackedMicroBatch], options: ForwardOptions,
                      on_outputs: Callable, forward_only: bool) -> None:
        """Megatron's ``get_forward_backward_func()`` over ``chunks`` (one per virtual stage).

        ``on_outputs(outputs, mb)`` runs on the last stage for each real micro-batch and returns the
        loss (training) or None. Interleaved schedule (virtual stages), two constraints:

        * the number of micro-batches must be a multiple of PP: empty micro-batches (a copy of the
          first, zero loss, not reported) are appended;
        * every micro-batch gets the same length (padding tail; under CP the same padded layout
          total) and fixed shapes are exchanged: measured on gloo, its variable-length shape exchange
          deadlocks (1F1B keeps ``variable_seq_lengths``).
        """
        from megatron.core.pipeline_parallel import get_forward_backward_func

        pp = self.dist["pp_size"]
        interleaved = len(chunks) > 1
        real = len(micro_batches)
        batches = list(micro_batches) + [micro_batches[0]] * ((-real) % pp if interleaved else 0)
        lengths = [mb.num_tokens for mb in micro_batches]
        min_total = 0
        if interleaved:
            if self.dist["cp_size"] > 1:  # equal CP layout totals
                min_total = max(context_parallel_layout(chunks[0], mb).num_padded_tokens for mb in batches)
                seq_length = min_total
            else:
                seq_length = max(lengths)
                pad_id = 0 if self.facts.image_token_id != 0 else 1
                batches = [mb.padded_to(seq_length, pad_id) for mb in batches]
            for chunk in chunks:
                chunk.config.variable_seq_lengths = False
        else:
            seq_length = max(mb.num_tokens for mb in batches)
        iterators = [iter(enumerate(batches)) for _ in chunks]

        def forward_step(data_iterator, model):
            index, mb = next(data_iterator)
            mb = mb.to(self.device)
            chunk = getattr(model, "module", model)  # Megatron DDP wraps the chunk
            layout = context_parallel_layout(chunk, mb, min_total)
            hidden = forward_hidden(chunk, mb, layout)
            if not chunk.post_process:
                return hidden, lambda out: (out.sum() * 0.0, torch.ones((), dtype=torch.int, device=out.device), {})
            outputs = logprobs_from_hidden(chunk, hidden, mb, options, layout)

            def loss_func(_output_tensor):
                if index >= real:  # padding micro-batch: no loss, no gradient, not reported
                    loss = outputs.logprobs.sum() * 0.0
                else:
                    loss = on_outputs(_trimmed(outputs, lengths[index]), micro_batches[index].to(self.device))
                    if loss is None:
                        loss = torch.zeros((), device=self.device)
                # (loss, num_tokens, reporting): with calculate_per_token_loss Megatron does not rescale the loss
                return loss, torch.ones((), dtype=torch.int, device=loss.device), {"loss": loss.detach()}

            return outputs.logprobs, loss_func

        model = chunks if forward_only or self.cpu_path else self.model
        get_forward_backward_func()(forward_step_func=forward_step,
                                    data_iterator=iterators if interleaved else iterators[0],
                                    model=list(model), num_microbatches=len(batches),
                                    seq_length=seq_length, micro_batch_size=1, forward_only=forward_only)

    def _pipeline_forward_only(self, chunks, micro_batches, options):
        """PP>1 no-grad pass with Megatron's schedule; results broadcast from the last stage."""
        from megatron.core import parallel_state as mps

        results: list[ForwardOutputs] = []

        def keep(outputs, mb):
            results.append(_detach_to_cpu(outputs))

        self._run_schedule(chunks, micro_batches, options, keep, forward_only=True)
        holder = [results if mps.is_pipeline_last_stage() else None]
        last = mps.get_pipeline_model_parallel_last_rank()
        dist.broadcast_object_list(holder, src=last, group=mps.get_pipeline_model_parallel_group())
        return holder[0]

    # ------------------------------------------------------------------ protocol: train
    def train_step(self, micro_batches: list[PackedMicroBatch], loss_fn: LossFn, normalisers: dict) -> StepResult:
        if self._sleeping is not None:
            raise RuntimeError("train_step called while the backend sleeps; call wake() first")
        lr = learning_rate_at(self.step_count, self.train.lr, self.train.warmup_steps)
        self.optimizer.set_lr(lr)
        self.optimizer.zero_grad()
        for chunk in self.policy_chunks:
            chunk.train()
        options = ForwardOptions(with_entropy=self.options.train_with_entropy,
                                 logprob_chunk_tokens=self.options.logprob_chunk_tokens,
                                 temperature=self.options.temperature)
        if self.cpu_path and self.dist["pp_size"] == 1:
            losses, metric_list = self._cpu_forward_backward(micro_batches, loss_fn, normalisers, options)
        else:
            losses, metric_list = self._schedule_forward_backward(micro_batches, loss_fn, normalisers, options)
        ok, grad_norm = self.optimizer.step()
        from megatron.core import parallel_state as mps

        # a host number: reduced on the DP group's device (NCCL on GPU rejects CPU tensors)
        total_loss = all_reduce_host_values([float(sum(losses))],
                                            mps.get_data_parallel_group() if self.dist["dp_size"] > 1 else None)[0]
        metrics = _sum_metrics(metric_list, mps.get_data_parallel_group() if self.dist["dp_size"] > 1 else None)
        if self.dist["pp_size"] > 1:  # the loss lives on the last stage; every stage reports it
            holder = [(float(total_loss), metrics)]
            dist.broadcast_object_list(holder, src=mps.get_pipeline_model_parallel_last_rank(),
                                       group=mps.get_pipeline_model_parallel_group())
            total_loss, metrics = torch.tensor(holder[0][0], dtype=torch.float64), holder[0][1]
        if ok:
            self.step_count += 1
        else:
            self.optimizer.zero_grad()
        return StepResult(loss=float(total_loss), grad_norm=float(grad_norm), learning_rate=lr, skipped=not ok,
                          metrics=metrics)

    def _cpu_forward_backward(self, micro_batches, loss_fn, normalisers, options):
        losses, metric_list = [], []
        for mb in micro_batches:
            mb = mb.to(self.device)
            outputs = packed_forward(self.policy, mb, options)
            loss, metrics = loss_fn(outputs, mb, normalisers)
            loss.backward()
            losses.append(float(loss.detach()))
            metric_list.append(metrics)
        self._reduce_grads_cpu()
        return losses, metric_list

    def _reduce_grads_cpu(self) -> None:
        """CPU path: what ``finalize_model_grads`` does on GPU (TP-partial gradients, tied embeddings
        over PP), then the DP x CP sum. As on GPU, the replicated vision tower is not reduced over TP:
        each TP rank already holds its full gradient (the distributed tests check every rank's copy)."""
        from megatron.core import parallel_state as mps

        tp_group = mps.get_tensor_model_parallel_group()
        for chunk in self.policy_chunks:
            allreduce_tp_partial_grads(chunk, tp_group)
        allreduce_tied_embedding_grads(self.policy_chunks)
        self.optimizer.reduce_grads()

    def _schedule_forward_backward(self, micro_batches, loss_fn, normalisers, options):
        """Megatron's ``get_forward_backward_func`` schedule (1F1B / interleaved under PP): the GPU path
        over Megatron DDP, and the CPU path under pipeline parallelism (plain modules, gradients
        reduced explicitly afterwards)."""
        losses, metric_list = [], []

        def compute_loss(outputs, mb):
            loss, metrics = loss_fn(outputs, mb, normalisers)
            losses.append(float(loss.detach()))
            metric_list.append(metrics)
            return loss

        if not self.cpu_path:
            for ddp in self.model:
                ddp.zero_grad_buffer()
        self._run_schedule(self.policy_chunks, micro_batches, options, compute_loss, forward_only=False)
        if self.cpu_path:
            self._reduce_grads_cpu()
        return losses, metric_list

    # ------------------------------------------------------------------ protocol: weights / checkpoints
    def export_weights(self, bucket_bytes: int = 512 << 20, views: bool = False) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """HF-named full tensors in buckets, through ``weight_export`` (the shared mapping). While
        asleep only the policy weights come back for it (no gradients, master weights, Adam moments
        or reference model), and they are freed again afterwards without a copy. ``views``: see
        ``weight_export`` (read-only, each bucket consumed before the next is asked for)."""
        from care_megatron.training.megatron import weight_export

        with self._weights_awake():
            yield from weight_export.export_weights(self, bucket_bytes, views=views)

    def state_dict_for_checkpoint(self) -> dict:
        with self._temporarily_awake():
            prefixed = len(self.policy_chunks) > 1
            return {"model": {(f"chunk{v}." if prefixed else "") + k: t.detach().cpu().clone()
                              for v, chunk in enumerate(self.policy_chunks)
                              for k, t in chunk.state_dict().items() if torch.is_tensor(t)},
                    "optimizer": self.optimizer.state_dict(), "step": self.step_count}

    def save_checkpoint(self, path: str) -> None:
        with self._temporarily_awake():
            self._save_checkpoint(path)

    def load_checkpoint(self, path: str) -> None:
        with self._temporarily_awake():
            self._load_checkpoint(path)

    def _save_checkpoint(self, path: str) -> None:
        ckpt.save_model(self.policy_chunks, f"{path}/model")
        ckpt.save_optimizer(self.optimizer, self.policy_chunks, f"{path}/optimizer",
                            {"step": self.step_count, "layout": list(self._layout())})

    def _load_checkpoint(self, path: str) -> None:
        """Weights, then the optimizer state (Adam moments, fp32 masters), both resharded to this
        layout; without optimizer state the fp32 masters are refreshed from the loaded weights."""
        ckpt.load_model(self.policy_chunks, f"{path}/model")
        common = ckpt.load_optimizer(self.optimizer, self.policy_chunks, f"{path}/optimizer")
        if common is None:
            log.warning("checkpoint %s has no optimizer state: the optimizer starts fresh from its weights", path)
            self.optimizer.reload_model_params()
            return
        self.step_count = int(common["step"])
        if tuple(common["layout"]) != self._layout():
            log.info("checkpoint %s was written at TP/PP/DP/CP/VP %s; weights and optimizer state resharded to %s",
                     path, tuple(common["layout"]), self._layout())

    def _layout(self) -> tuple:
        return (self.dist["tp_size"], self.dist["pp_size"], self.dist["dp_size"], self.dist["cp_size"], self.vp_size or 1)

    # ------------------------------------------------------------------ protocol: memory
    def sleep(self) -> None:
        """Move weights, gradients and optimizer state off the accelerator to host memory (views
        stay valid). A no-op on the CPU path: there is no accelerator memory to free."""
        if self._sleeping is not None or self.cpu_path:
            return
        self._offload()

    def _offload(self) -> None:
        kept, dropped = self._sleep_plan()
        self._host_offloader.offload(keep=kept, drop=dropped)
        self._sleeping = self._host_offloader
        if torch.cuda.is_available() and not self.cpu_path:
            torch.cuda.empty_cache()

    def _sleep_plan(self) -> tuple[list, list]:
        """(kept, dropped) tensors of a sleep: weights, optimizer state and the on-device reference
        are copied to the host; gradient buffers are dropped (the next step zeroes them anyway)."""
        params = self._policy_parameters()
        kept = [p.data for p in params] + _optimizer_tensors(self.optimizer)
        if self.reference is not None and not self.parallel.offload_reference_to_cpu:
            kept += [p.data for ref in self.reference_chunks for p in ref.parameters()]
        dropped = [p.grad for p in params] + [getattr(p, "main_grad", None) for p in params]
        return kept, dropped

    def wake(self) -> None:
        """Restore what sleep offloaded; gradient buffers come back zero-filled."""
        if self._sleeping is None:
            return
        self._sleeping.restore()
        self._sleeping = None

    @contextlib.contextmanager
    def _temporarily_awake(self):
        """Checkpointing while asleep: restore everything, then offload it again."""
        asleep = self._sleeping is not None
        if asleep:
            self.wake()
        try:
            yield
        finally:
            if asleep:
                self._offload()

    @contextlib.contextmanager
    def _weights_awake(self):
        """Weight export while asleep: only the policy weights' storages come back, and are freed
        again without a copy (the export reads them; the host copy stays current)."""
        if self._sleeping is None:
            yield
            return
        self._sleeping.restore([p.data for p in self._policy_parameters()])
        try:
            yield
        finally:
            self._sleeping.release()


def install_loss_scaling(chunks, megatron_optimizer) -> None:
    """Megatron's schedules multiply each micro-batch loss by ``config.grad_scale_func`` before
    backward, and its fp16 optimizer divides the gradients by the same dynamic loss scale in
    ``step()``: without this hook fp16 gradients would be divided by a scale they never had
    (Megatron-LM's training.py sets ``config.grad_scale_func = optimizer.scale_loss``). For bf16 /
    fp32 the optimizer's scale is 1."""
    for chunk in chunks:
        chunk.config.grad_scale_func = megatron_optimizer.scale_loss


def allreduce_tp_partial_grads(model, group) -> None:
    """Sum over TP the gradients that each TP rank holds only a part of (what Megatron's
    ``finalize_model_grads`` does on GPU): sequence-parallel norms (this rank's token slice) and the
    per-head QK-norm weights (this rank's heads)."""
    if group is None or dist.get_world_size(group) == 1:
        return
    for name, p in model.named_parameters():
        partial = getattr(p, "sequence_parallel", False) or "q_layernorm" in name or "k_layernorm" in name
        if partial and p.grad is not None:
            dist.all_reduce(p.grad, group=group)


def allreduce_tied_embedding_grads(chunks) -> None:
    """Pipeline parallelism with tied embeddings: the first stage's embedding and the last stage's
    output copy are one weight; sum their gradients over Megatron's embedding group (CPU path).
    ``chunks``: this rank's model chunks (one per virtual stage); the weight lives in the chunk that
    holds the first (pre-process) or the last (post-process) model stage."""
    from megatron.core import parallel_state as mps

    chunks = chunks if isinstance(chunks, (list, tuple)) else [chunks]
    if (not chunks[0].share_embeddings_and_output_weights or mps.get_pipeline_model_parallel_world_size() == 1
            or not mps.is_rank_in_embedding_group(ignore_virtual=True)):
        return
    holder = [c for c in chunks if c.pre_process] or [c for c in chunks if c.post_process]
    weight = holder[0].shared_embedding_or_output_weight()
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    dist.all_reduce(weight.grad, group=mps.get_embedding_group())


def offload_storages(tensors) -> HostOffloader:
    """Copy each distinct storage of ``tensors`` to the host and free it (views stay valid after restore)."""
    offloader = HostOffloader()
    offloader.offload(keep=tensors)
    return offloader


def restore_storages(saved: HostOffloader) -> None:
    saved.restore()


def _optimizer_tensors(optimizer) -> list:
    inner = getattr(optimizer, "optimizer", optimizer)
    out = []
    for opt in getattr(inner, "chained_optimizers", [inner]):
        base = getattr(opt, "optimizer", opt)
        for state in getattr(base, "state", {}).values():
            out += [v for v in state.values() if torch.is_tensor(v) and v.dim() > 0]
        for group in getattr(base, "param_groups", []):  # fp32 master copies of bf16 weights (Megatron)
            out += [p.data for p in group["params"]]
    return out


def _trimmed(out: ForwardOutputs, num_tokens: int) -> ForwardOutputs:
    """Outputs of a micro-batch padded for the schedule, cut back to its own length (differentiable)."""
    if out.logprobs.shape[0] == num_tokens:
        return out
    return ForwardOutputs(logprobs=out.logprobs[:num_tokens],
                          entropy=None if out.entropy is None else out.entropy[:num_tokens],
                          think_embeddings=out.think_embeddings)


def _detach_to_cpu(out: ForwardOutputs) -> ForwardOutputs:
    return ForwardOutputs(
        logprobs=out.logprobs.detach().float().cpu(),
        entropy=None if out.entropy is None else out.entropy.detach().float().cpu(),
        think_embeddings=None if out.think_embeddings is None else out.think_embeddings.detach().float().cpu(),
    )


def _sum_metrics(metric_list: list[dict], dp_group=None) -> dict[str, float]:
    """Loss metrics combined over micro-batches and data-parallel ranks, plus ``micro_batches``.

    Same contract as the plain-PyTorch backend (:func:`~care_megatron.algorithm.policy_losses.combine_loss_metrics`):
    the losses' metrics are globally normalised (so their sum is the update's value) or additive
    counts; ``min/*`` / ``max/*`` are reduced by minimum / maximum.
    """
    combined: dict[str, float] = {}
    for metrics in metric_list:
        combine_loss_metrics(combined, metrics or {})
    combined["micro_batches"] = float(len(metric_list))
    if dp_group is not None and dist.is_initialized() and dist.get_world_size(dp_group) > 1:
        # every rank reduces the same keys: every rank runs the same loss, whose metric keys do not
        # depend on the data (a micro-batch without response tokens reports min/max as +-inf)
        by_op = {"min/": dist.ReduceOp.MIN, "max/": dist.ReduceOp.MAX}
        for op in (dist.ReduceOp.MIN, dist.ReduceOp.MAX, dist.ReduceOp.SUM):
            keys = sorted(k for k in combined if by_op.get(k[:4], dist.ReduceOp.SUM) == op)
            if keys:
                values = all_reduce_host_values([combined[k] for k in keys], dp_group, op=op)  # on the group's device
                combined.update(zip(keys, values.tolist()))
    return combined
