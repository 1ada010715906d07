"""Training backends by name; each is imported only when chosen."""
from __future__ import annotations

from care_megatron.config.schema import RunConfig

BACKENDS = ("torch", "megatron")


def build_backend(config: RunConfig, model, *, lr: float | None = None, keep_reference: bool = True, hf_dir=None):
    """The ``TrainingBackend`` named by ``config.parallel.backend`` around ``model`` (a transformers model).

    ``lr`` overrides ``config.train.lr`` (SFT uses ``train.sft_lr``); ``keep_reference`` keeps a frozen
    copy for the KL term.
    """
    name = config.parallel.backend
    lr = config.train.lr if lr is None else lr
    if name == "torch":
        import torch

        from care_megatron.rollout.mismatch import logprob_temperature
        from care_megatron.training.torch_backend import TorchBackend

        return TorchBackend(model, lr=lr, weight_decay=config.train.weight_decay,
                            warmup_steps=config.train.warmup_steps, grad_clip=config.train.grad_clip,
                            temperature=logprob_temperature(config.rollout.temperature),
                            keep_reference=keep_reference, group_by_length=config.train.group_by_length,
                            device="cuda" if torch.cuda.is_available() else "cpu")
    if name == "megatron":
        try:
            from care_megatron.training.megatron.backend import MegatronBackend
        except ImportError as exc:
            raise ImportError(f"parallel.backend=megatron needs megatron-core: pip install 'care_megatron[megatron]' ({exc})") from exc
        return MegatronBackend.from_run_config(config, model, lr=lr, keep_reference=keep_reference)
    raise ValueError(f"unknown training backend {name!r}; valid: {', '.join(BACKENDS)}")
