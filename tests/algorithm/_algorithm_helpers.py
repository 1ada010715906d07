"""Batch builders shared by the algorithm tests."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def load_bench_tool():
    """tools/bench_advantages.py as a module (it holds the per-group loop reference)."""
    spec = importlib.util.spec_from_file_location("bench_advantages", REPO / "tools" / "bench_advantages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def angle_embeddings(degrees, dim: int = 4) -> torch.Tensor:
    """Unit vectors in the first plane at the given angles (cosine distance grows with the angle gap)."""
    out = torch.zeros(len(degrees), dim, dtype=torch.float64)
    for i, deg in enumerate(degrees):
        out[i, 0] = math.cos(math.radians(deg))
        out[i, 1] = math.sin(math.radians(deg))
    return out


def group(rewards, correct, think=None, answer=None, emb=None, logprobs=None, gid=0):
    """One group as the keyword arguments of care_advantages (minus config)."""
    n = len(rewards)
    return dict(
        group_index=torch.full((n,), gid, dtype=torch.long),
        rewards=torch.tensor(rewards, dtype=torch.float32),
        correct=torch.tensor(correct, dtype=torch.bool),
        think_lengths=torch.tensor(think if think is not None else [10] * n, dtype=torch.long),
        answer_lengths=torch.tensor(answer if answer is not None else [3] * n, dtype=torch.long),
        think_embeddings=emb if emb is not None else torch.randn(n, 6),
        sequence_logprobs=torch.tensor(logprobs if logprobs is not None else [0.0] * n),
    )


def concat(*groups):
    return {key: torch.cat([g[key] for g in groups]) for key in groups[0]}
