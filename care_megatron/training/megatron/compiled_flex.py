"""The one compiled ``flex_attention`` of the process, shared by packed attention
(:mod:`.attention`) and context-parallel attention (:mod:`.context_parallel`): one compile cache per
kind of call (grad / no-grad x square / rectangular mask), and no silent eager fallback."""
from __future__ import annotations

import functools
import types

import torch


def _flex_call(query, key, value, block_mask, scale, enable_gqa):
    """The frame torch.compile caches on; one copy of its code object per :class:`CompiledFlexAttention` variant."""
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


class CompiledFlexAttention:
    """Compiled ``flex_attention`` with one compile cache per kind of call, and no eager fallback.

    Dynamo keeps its compiled entries, and counts them against ``recompile_limit`` (8), per code
    object. Training and no-grad forwards, and square (packed) and rectangular (context-parallel
    rows against all keys) masks, each need their own graph; sharing one cache they exhaust the
    limit, and torch then runs the eager flex_attention, which builds the full [T, T] score matrix
    (out of memory at 8k tokens). So each kind gets its own copy of :func:`_flex_call`'s code
    object (its own cache), ``dynamic=None`` marks the lengths dynamic on the first recompile (two
    entries per kind, whatever the lengths), and ``fullgraph=True`` turns hitting the limit into an
    error, re-raised here with what to do about it.
    """

    def __init__(self, backend: str = "inductor"):
        self.backend = backend
        self._variants: dict[str, tuple] = {}

    @staticmethod
    def kind(query, key) -> str:
        grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)
        return f"{'train' if grad else 'no_grad'}_{'square' if query.shape[-2] == key.shape[-2] else 'rectangular'}"

    def compilations(self, kind: str) -> int:
        """Compiled entries cached for one kind (0 when never called)."""
        if kind not in self._variants:
            return 0
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return len(_debug_get_cache_entry_list(self._variants[kind][0].__code__))

    def __call__(self, query, key, value, *, block_mask, scale, enable_gqa=False):
        kind = self.kind(query, key)
        if kind not in self._variants:
            code = _flex_call.__code__.replace(co_name=f"flex_attention_{kind}")
            fresh = types.FunctionType(code, _flex_call.__globals__, code.co_name)
            self._variants[kind] = (fresh, torch.compile(fresh, dynamic=None, fullgraph=True, backend=self.backend))
        try:
            return self._variants[kind][1](query, key, value, block_mask, scale, enable_gqa)
        except Exception as error:
            if type(error).__name__ not in ("FailOnRecompileLimitHit", "FailOnCacheLimitHit"):
                raise
            limit = torch._dynamo.config.recompile_limit
            raise RuntimeError(
                f"compiled flex_attention ({kind}) needed more than torch._dynamo.config.recompile_limit={limit} "
                f"compilations (now {self.compilations(kind)}); refusing torch's eager fallback, which builds "
                "the full [T, T] score matrix. Run with TORCH_LOGS=recompiles to see which guard changes, "
                "or raise the limit.") from error


@functools.lru_cache(maxsize=1)
def compiled_flex_attention() -> CompiledFlexAttention:
    """The process-wide compiled flex_attention (packed and context-parallel attention share it)."""
    return CompiledFlexAttention()
