"""GroupedRolloutEngine: ranks of a rollout-TP group share the owner's engine (2 gloo processes)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from care_megatron.rollout.base import Completion, GenerationRequest, SamplingParams
from care_megatron.rollout.grouped import GroupedRolloutEngine, rollout_groups


class EchoEngine:
    """Deterministic engine: the completion of a request is its prompt reversed; records every call."""

    def __init__(self):
        self.calls, self.loaded, self.awake, self.memory_calls = [], {}, True, []

    def generate(self, requests, sampling):
        self.calls.append([r.request_id for r in requests])
        return [Completion(r.request_id, list(reversed(r.prompt_ids)), "", [0.0] * len(r.prompt_ids), "stop")
                for r in requests]

    def update_weights(self, named):
        self.loaded.update({n: t.clone() for n, t in named})

    def sleep(self, tags=None):
        self.memory_calls.append(("sleep", tags))
        self.awake = False

    def wake(self, tags=None):
        self.memory_calls.append(("wake", tags))
        self.awake = tags is None or "kv_cache" in tags


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    engine = EchoEngine() if rank == 0 else None
    grouped = GroupedRolloutEngine(engine, group=None, owner_rank=0, stop_token_ids=[7], tp_rank=rank, group_size=2)
    requests = [GenerationRequest(f"r{rank}-{i}", prompt_ids=[rank, i, 10 + i]) for i in range(2 + rank)]
    completions = grouped.generate(requests, SamplingParams())
    grouped.sleep()
    grouped.wake(("weights",))
    grouped.wake(("kv_cache",))
    grouped.update_weights([("w", torch.full((2,), float(rank)))])
    result = {"ids": [c.request_id for c in completions], "tokens": [c.token_ids for c in completions]}
    if engine is not None:
        result.update(calls=engine.calls, loaded=engine.loaded["w"].tolist(), awake=engine.awake,
                      memory_calls=engine.memory_calls)
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_requests_are_gathered_on_the_owner_and_completions_scattered_back(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["ids"] == ["r0-0", "r0-1"] and r1["ids"] == ["r1-0", "r1-1", "r1-2"]
    assert r1["tokens"] == [[10, 0, 1], [11, 1, 1], [12, 2, 1]]
    # the owner decoded the whole group's requests in one call, in rank order
    assert r0["calls"] == [["r0-0", "r0-1", "r1-0", "r1-1", "r1-2"]]
    assert r0["loaded"] == [0.0, 0.0] and r0["awake"] is True  # the owner loads its own copy
    # the tagged wake reaches the owner's engine unchanged, in order
    assert r0["memory_calls"] == [("sleep", None), ("wake", ("weights",)), ("wake", ("kv_cache",))]


def test_rollout_groups_tile_nodes():
    assert rollout_groups(8, 4, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ValueError):
        rollout_groups(8, 4, 3)


def test_only_the_owner_holds_the_engine():
    with pytest.raises(ValueError, match="owner"):
        GroupedRolloutEngine(None, group=None, owner_rank=0, stop_token_ids=[], tp_rank=0, group_size=2)


class SamplingEngine(EchoEngine):
    """Samples: every request of a call gets fresh random tokens (identical requests differ)."""

    def generate(self, requests, sampling):
        self.calls.append([r.request_id for r in requests])
        g = torch.Generator().manual_seed(len(self.calls))
        return [Completion(r.request_id, torch.randint(0, 100, (4,), generator=g).tolist(), "", [0.0] * 4, "stop")
                for r in requests]


def _replica_worker(rank, port, out, same_seed):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    engine = SamplingEngine() if rank == 0 else None
    grouped = GroupedRolloutEngine(engine, group=None, owner_rank=0, stop_token_ids=[7], tp_rank=rank, group_size=2)
    # both ranks hold the same prompts (TP peers of one model replica); the seed says which replica
    requests = [GenerationRequest(f"g0-{i}", prompt_ids=[5, i]) for i in range(3)]
    completions = grouped.generate(requests, SamplingParams(seed=11 if same_seed else 11 + rank))
    result = {"tokens": [c.token_ids for c in completions]}
    if engine is not None:
        result["calls"] = engine.calls
    torch.save(result, os.path.join(out, f"replica{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("same_seed", [True, False], ids=["tp_peers", "dp_ranks"])
def test_identical_request_lists_are_decoded_once_and_shared(tmp_path, same_seed):
    mp.spawn(_replica_worker, args=(_free_port(), str(tmp_path), same_seed), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "replica0.pt"), torch.load(tmp_path / "replica1.pt")
    if same_seed:  # model-parallel peers: one decode, the same sequences on both ranks
        assert r0["calls"] == [["g0-0", "g0-1", "g0-2"]]
        assert r0["tokens"] == r1["tokens"]
    else:  # different data-parallel replicas: both decoded, independent samples
        assert r0["calls"] == [["g0-0", "g0-1", "g0-2"] * 2]
        assert r0["tokens"] != r1["tokens"]
