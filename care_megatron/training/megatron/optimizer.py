"""Optimizer adapter: one object with ``zero_grad / step -> (ok, grad_norm) / set_lr / state_dict``.

* GPU: Megatron's optimizer from ``get_megatron_optimizer`` (distributed optimizer when
  ``parallel.use_distributed_optimizer``) over a Megatron-DDP-wrapped model. megatron-core picks its
  Adam at import time (Transformer Engine's ``FusedAdam``, else apex's, else torch's ``AdamW``);
  :func:`adam_implementation` reads the pick off the built optimizer, so the log says what runs.
  The parameter groups carry no learning-rate schedule (:func:`detach_lr_schedule`): the trainer
  sets ``lr`` every step, and a checkpoint then resumes under any ``train.lr``.
* CPU: ``torch.optim.AdamW`` with an explicit data-parallel gradient all-reduce (SUM, per the loss
  contract of ``care_megatron/training/base.py``) and a TP-aware global-norm clip, because Megatron's
  DDP and optimizers allocate CUDA buffers.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def adam_implementation(megatron_optimizer) -> str:
    """The Adam class megatron-core really built, e.g. ``transformer_engine FusedAdam``.

    megatron-core (0.16.1 and 0.19.2 alike, ``megatron/core/optimizer/__init__.py``) binds ``Adam`` at
    import time to Transformer Engine's ``FusedAdam``, else apex's, else ``torch.optim.AdamW``;
    guessing from what imports here would name apex whenever it is installed beside TE. So the answer
    comes from the optimizer objects themselves (one per chained optimizer; a rank without trainable
    parameters has none)."""
    picked = set()
    for optimizer in getattr(megatron_optimizer, "chained_optimizers", [megatron_optimizer]):
        inner = getattr(optimizer, "optimizer", None)
        if inner is not None:
            cls = type(inner)
            picked.add(f"{cls.__module__.split('.')[0]} {cls.__name__}")
    return " + ".join(sorted(picked)) or "none (no trainable parameters on this rank)"


# Keys of Megatron's parameter groups that only its ``OptimizerParamScheduler`` reads (``get_lr``);
# megatron-core 0.19 also matches saved to current groups on them (``param_group_identifier_keys``).
LR_SCHEDULE_KEYS = ("max_lr", "min_lr")


def detach_lr_schedule(param_groups) -> None:
    """Set the learning-rate schedule keys of Megatron parameter groups to None, in place.

    ``get_megatron_optimizer`` writes ``max_lr = config.lr`` into every group, and megatron-core 0.19
    pairs a checkpoint's groups with the current ones by ``max_lr``, ``min_lr``, ``start_wd``,
    ``end_wd``, ``wd_mult``, ... (``MegatronOptimizer._filter_and_reorder_param_groups``; the
    distributed optimizer's ``load_state_dict`` likewise): a resume after changing ``train.lr`` finds
    no match (ValueError, KeyError in the distributed optimizer). This project never builds Megatron's
    scheduler (the trainer sets each group's ``lr`` before every step), so the keys carry nothing; as
    None they match across any ``train.lr`` (0.19 treats a missing key and None alike; 0.16.1 does not
    match on them). Applied to the live groups and to a checkpoint's groups before loading, so
    checkpoints written before this change load too."""
    for group in param_groups:
        for key in LR_SCHEDULE_KEYS:
            group[key] = None


def saved_param_groups(state):
    """Every ``param_groups`` list in an optimizer state dict as Megatron's optimizers save it
    (``optimizer.param_groups`` of the mixed-precision and distributed optimizers, ``param_groups`` of
    the fp32 one, one entry per chained optimizer when there are several)."""
    if isinstance(state, dict):
        groups = state.get("param_groups")
        if isinstance(groups, list):
            yield groups
        for key, value in state.items():
            if key not in ("param_groups", "state", "param_state") and isinstance(value, dict):
                yield from saved_param_groups(value)


def param_is_tp_duplicate(param: torch.nn.Parameter, tp_rank: int) -> bool:
    """True for replicated parameters on TP ranks > 0 (counted once in the global norm)."""
    return not getattr(param, "tensor_model_parallel", False) and tp_rank > 0


def global_grad_norm(params, tp_group, tp_rank: int, grad_attr: str = "grad") -> float:
    """L2 norm of all gradients of the model-parallel model (TP shards summed, replicas once).

    ``tp_group`` is the group the squared norms are summed over: the TP group, or the TP x PP
    model-parallel group under pipeline parallelism (then the last stage's copy of tied embeddings,
    marked ``shared`` by Megatron, is skipped: the first stage counts it)."""
    device = None
    total = None
    for p in params:
        g = getattr(p, grad_attr, None)
        if g is None or param_is_tp_duplicate(p, tp_rank) or getattr(p, "shared", False):
            continue
        sq = g.detach().float().pow(2).sum()
        total = sq if total is None else total + sq
        device = g.device
    if total is None:  # no gradient on this rank: a zero on the device the group's collective needs
        from care_megatron.training.megatron.parallel_state import collective_device

        total = torch.zeros((), device=device or (collective_device(tp_group) if tp_group is not None else "cpu"))
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(total, group=tp_group)
    return float(total.sqrt())


class CpuOptimizer:
    """AdamW + DP all-reduce (sum) + clip; used where Megatron's CUDA optimizer cannot run."""

    name = "torch.optim.AdamW (CPU, explicit all-reduce)"

    def __init__(self, params, lr: float, weight_decay: float, clip: float, tp_group, tp_rank: int, dp_group,
                 norm_group=None):
        self.params = [p for p in params if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8)
        self.clip, self.tp_group, self.tp_rank, self.dp_group = clip, tp_group, tp_rank, dp_group
        self.norm_group = norm_group if norm_group is not None else tp_group  # TP x PP under pipeline parallelism

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def reduce_grads(self) -> None:
        """Sum gradients over data-parallel (x context-parallel) replicas (one flat all-reduce).

        A parameter without a gradient on this rank (e.g. the vision tower when its micro-batches held
        no image) contributes zeros, so every rank reduces the same flat layout."""
        if self.dp_group is None or dist.get_world_size(self.dp_group) == 1:
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.dp_group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def step(self) -> tuple[bool, float]:
        """Clip and step; skip (return False) on a non-finite norm. Grads must already be reduced."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        norm = global_grad_norm(self.params, self.norm_group, self.tp_rank)
        if not math.isfinite(norm):
            return False, norm
        if self.clip and self.clip > 0 and norm > self.clip:
            scale = self.clip / (norm + 1e-6)
            for p in self.params:
                p.grad.mul_(scale)
        self.optimizer.step()
        return True, norm

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def _ensure_state(self) -> None:
        """Give every parameter AdamW's state (step 0, zero moments: what torch's first ``step`` would
        allocate, and it steps the same), so save and load see one fixed layout."""
        for p in self.params:
            state = self.optimizer.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False) -> dict:
        """The AdamW state as ShardedTensors laid out like the parameters they belong to (global keys
        and offsets, so it reshards on load the way the model does), the shared step in the common
        part: what megatron-core's ``FP32Optimizer.sharded_state_dict`` does for its torch optimizer."""
        from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                                optim_state_to_sharding_state)

        self._ensure_state()
        state = self.optimizer.state_dict()
        steps = {float(s["step"]) for s in state["state"].values()}
        if len(steps) > 1:
            raise ValueError(f"AdamW steps differ across parameters: {sorted(steps)}")
        step = next(iter(state["state"].values()))["step"].clone() if state["state"] else torch.tensor(0.0)
        id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, self.params)
        optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
        state["state"]["common_step"] = step
        return state

    def load_sharded_state_dict(self, state: dict) -> None:
        step = state["state"].pop("common_step")
        for param_state in state["state"].values():
            param_state["step"] = torch.as_tensor(step).clone()
        self.optimizer.load_state_dict(state)

    def reload_model_params(self) -> None:
        """Nothing to refresh: AdamW steps the parameters themselves (no fp32 master copies)."""


class MegatronOptimizerAdapter:
    """Megatron (distributed) optimizer over a Megatron-DDP model (GPU)."""

    def __init__(self, ddp_chunks, dtype: torch.dtype, lr: float, weight_decay: float, clip: float,
                 use_distributed_optimizer: bool):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        config = OptimizerConfig(optimizer="adam", lr=lr, min_lr=0.0, weight_decay=weight_decay, adam_beta1=0.9,
                                 adam_beta2=0.999, adam_eps=1e-8, clip_grad=clip, bf16=dtype == torch.bfloat16,
                                 fp16=dtype == torch.float16, params_dtype=dtype,
                                 use_distributed_optimizer=use_distributed_optimizer)
        chunks = list(ddp_chunks) if isinstance(ddp_chunks, (list, tuple)) else [ddp_chunks]
        self.optimizer = get_megatron_optimizer(config, chunks)
        detach_lr_schedule(self.optimizer.param_groups)
        self.name = (f"megatron {'distributed ' if use_distributed_optimizer else ''}adam "
                     f"({adam_implementation(self.optimizer)})")
        log.info("optimizer: %s", self.name)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> tuple[bool, float]:
        ok, grad_norm, _ = self.optimizer.step()
        return bool(ok), float(grad_norm) if grad_norm is not None else float("nan")

    def state_dict(self) -> dict:
        """Not a checkpoint: the distributed optimizer's ``state_dict()`` leaves out the Adam moments
        and fp32 master parameters. Checkpoints go through :meth:`sharded_state_dict`."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    # Megatron-LM's checkpointing (``generate_state_dict`` / ``load_checkpoint``) with its
    # ``--dist-ckpt-optim-fully-reshardable`` metadata: the moments and fp32 masters are saved per
    # model parameter with global offsets, so a checkpoint reloads at another TP / PP / DP layout.
    SHARDED_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}

    def sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False) -> dict:
        """Megatron's optimizer ``sharded_state_dict``; with ``is_loading`` it first allocates the state
        that ``dist_checkpointing.load`` fills in place."""
        return self.optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading,
                                                 metadata=dict(self.SHARDED_METADATA))

    def load_sharded_state_dict(self, state: dict) -> None:
        """Apply what ``dist_checkpointing.load`` returned for :meth:`sharded_state_dict` (moments, fp32
        masters, step, grad scaler); the saved groups lose their schedule keys first, as the live ones
        did (:func:`detach_lr_schedule`), so the load does not depend on ``train.lr``."""
        for groups in saved_param_groups(state):
            detach_lr_schedule(groups)
        self.optimizer.load_state_dict(state)

    def reload_model_params(self) -> None:
        """Copy the model parameters into the fp32 master parameters (weights loaded without optimizer
        state, e.g. a converted checkpoint): otherwise the first step starts from stale masters."""
        self.optimizer.reload_model_params()


def learning_rate_at(step: int, peak: float, warmup_steps: int) -> float:
    """Linear warm-up over ``warmup_steps`` optimizer steps, then constant (TrainConfig semantics)."""
    if warmup_steps <= 0:
        return peak
    return peak * min(1.0, (step + 1) / warmup_steps)
