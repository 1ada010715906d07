"""The vectorised care_advantages equals the per-group loop reference of tools/bench_advantages.py."""
import math

import pytest
import torch

from care_megatron.algorithm.care import CareConfig, care_advantages
from _algorithm_helpers import load_bench_tool

bench = load_bench_tool()


def ragged_batch(seed, num_groups=40, dim=12):
    """Groups of 1..10 rollouts, interleaved rows, sparse group ids, ties in think / answer lengths."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 11, (num_groups,), generator=gen)
    ids = torch.randperm(1000, generator=gen)[:num_groups] * 3
    group_index = ids.repeat_interleave(sizes)
    n = group_index.numel()
    p = torch.rand(num_groups, generator=gen).repeat_interleave(sizes)
    correct = torch.rand(n, generator=gen) < p
    fmt = (torch.rand(n, generator=gen) < 0.7).float()
    partial = torch.randint(0, 3, (n,), generator=gen).float() / 10  # partial credit creates ties and spread
    rewards = torch.where(correct, 0.9 + 0.1 * fmt, partial * fmt)
    think = torch.randint(0, 4, (n,), generator=gen)  # few values: anchor ties are common
    answer = torch.randint(0, 3, (n,), generator=gen)
    emb = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    logprobs = -torch.randint(0, 3, (n,), generator=gen).double()
    perm = torch.randperm(n, generator=gen)
    return [t[perm] for t in (group_index, rewards, correct, think, answer, emb, logprobs)]


CONFIGS = [
    CareConfig(),
    CareConfig(k=2, preselect_m=3),
    CareConfig(k=6, preselect_m=4, equalize=False),
    CareConfig(k=3, robust_stats=True),
    CareConfig(rescue=False, anchor_rule="shortest_think"),
    CareConfig(anchor_rule="random", seed=5),
    CareConfig(negative_selector="random", seed=2),
    CareConfig(negative_selector="farthest"),
    CareConfig(negative_selector="mixed", k=5, preselect_m=8),
]


def _compare(batch, config, reflected_from=None):
    fast, info = care_advantages(*batch, config, reflected_from=reflected_from)
    slow, ref = bench.care_advantages_loop(*batch, config, reflected_from=reflected_from)
    assert torch.allclose(fast.double(), slow, atol=1e-6, rtol=1e-6), float((fast.double() - slow).abs().max())
    assert info["anchor_index"].tolist() == ref["anchor_index"]
    assert info["num_negatives"].tolist() == ref["num_negatives"]
    assert info["rgr_target"].tolist() == ref["rgr_target"]
    assert info["rescue"].tolist() == ref["rescue"]
    negatives = [[i for i in row if i >= 0] for row in info["negative_indices"].tolist()]
    assert negatives == ref["negative_indices"]
    return info


@pytest.mark.parametrize("config_index", range(len(CONFIGS)))
@pytest.mark.parametrize("seed", [0, 1])
def test_vectorised_matches_loop(config_index, seed):
    _compare(ragged_batch(seed), CONFIGS[config_index])


@pytest.mark.parametrize("seed", [3, 4])
def test_vectorised_matches_loop_with_reflections(seed):
    config = CareConfig()
    batch = ragged_batch(seed)
    _, info = care_advantages(*batch, config)
    targets = info["rgr_target"][info["rgr_target"] >= 0]
    gen = torch.Generator().manual_seed(seed)
    n, m = batch[1].numel(), targets.numel()
    assert m > 3
    ok = torch.rand(m, generator=gen) < 0.5
    extra = [
        batch[0][targets],
        torch.where(ok, 1.0, 0.1),
        ok,
        torch.randint(0, 4, (m,), generator=gen),
        torch.randint(0, 3, (m,), generator=gen),
        torch.randn(m, batch[5].shape[1], generator=gen, dtype=torch.float64),
        torch.zeros(m, dtype=torch.float64),
    ]
    # also one reflection of a rollout that is not a selected negative: ignored by both
    outside = [i for i in range(n) if info["role"][i] == 0][:1]
    full = [torch.cat([a, b]) for a, b in zip(batch, extra)]
    reflected_from = torch.cat([torch.full((n,), -1), targets])
    if outside:
        full = [torch.cat([a, a[outside]]) for a in full]
        reflected_from = torch.cat([reflected_from, torch.tensor(outside)])
    info2 = _compare(full, config, reflected_from)
    assert int(info2["reflection_used"].sum()) == m
    assert int(info2["reflection_ignored"].sum()) == len(outside)


def test_bench_batch_parity():
    batch = bench.random_batch(64, 8, 32, seed=7)
    _compare(batch, CareConfig())


def test_vectorised_speed_512_groups_one_thread():
    """512 groups x 8 rollouts well under 50 ms on one core (best of 10, robust to a busy shared machine)."""
    import time

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batch = bench.random_batch(512, 8, 256, seed=0)
        care_advantages(*batch, CareConfig())
        best = math.inf
        for _ in range(10):
            start = time.perf_counter()
            care_advantages(*batch, CareConfig())
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    assert best < 0.05, f"{best * 1e3:.1f} ms"
