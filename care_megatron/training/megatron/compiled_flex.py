"""The one compiled ``flex_attention`` of the process, shared by packed attention
(:mod:`.attention`) and context-parallel attention (:mod:`.context_parallel`), so both reuse the same
compiled graphs instead of compiling their own."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # dynamic=None: the first recompile marks the lengths dynamic, so the varying packed lengths of
    # RL micro-batches do not recompile per shape (and never hit the recompile limit, after which
    # torch would fall back to the eager flex_attention that materialises the full score matrix)
    return torch.compile(flex_attention, dynamic=None)
