"""Host-side collectives of an RL step use the device their group needs (NCCL rejects CPU tensors).

Two gloo ranks with the collective guard (``_collective_guard``: every group counts as NCCL-like and
a tensor collective given a host tensor raises): the step's normalisers, mismatch / TIS metrics, the
backend's loss and metric sums reduce to the right values, and the guard really catches the pattern
they used to have (a ``torch.tensor(...)`` built on the host and all-reduced).
"""
import os
import signal
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("megatron.core")

from care_megatron.training.megatron import parallel_state  # noqa: E402

pytestmark = pytest.mark.distributed


def test_collective_device_follows_the_group_backend(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    for backend, expected in [("nccl", torch.device("cuda", 3)), ("gloo", torch.device("cpu")),
                              ("cpu:gloo,cuda:nccl", torch.device("cpu"))]:
        monkeypatch.setattr(parallel_state.dist, "get_backend", lambda group=None, b=backend: b)
        assert parallel_state.collective_device(object()) == expected, backend


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist

    import _collective_guard
    from care_megatron.data.batch import Sequence
    from care_megatron.data.packing import pack_sequences
    from care_megatron.rewards.regions import Region
    from care_megatron.training.megatron.backend import _sum_metrics
    from care_megatron.training.step_inputs import attach_loss_inputs, reduce_normalisers

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert _collective_guard.install()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.new_group([0, 1])
    result = {}
    # 1. the pattern NCCL rejects is caught, and a device-placed copy of it passes
    try:
        dist.all_reduce(torch.tensor([1.0, 2.0], dtype=torch.float64), group=group)
        result["caught"] = False
    except _collective_guard.HostTensorOnNcclGroup:
        result["caught"] = True
    placed = torch.tensor([1.0, 2.0], dtype=torch.float64).to(parallel_state.collective_device(group))
    dist.all_reduce(placed, group=group)
    result["placed"] = placed.tolist()
    # 2. the step's host collectives
    normalisers = reduce_normalisers({"num_sequences": 3.0 + rank, "num_advantaged_sequences": 2.0 + rank,
                                      "num_tokens": 10.0 * (rank + 1),
                                      "max_response_length": 7.0 + 5 * rank}, group)
    result["normalisers"] = normalisers
    g = torch.Generator().manual_seed(rank)
    seqs = []
    for i in range(3):
        n = 8 + i
        mask = torch.zeros(n, dtype=torch.bool)
        mask[3:] = True
        regions = torch.full((n,), int(Region.ANSWER))
        old = -torch.rand(n, generator=g) * mask
        seqs.append(Sequence(input_ids=torch.randint(5, 50, (n,), generator=g), loss_mask=mask, region_ids=regions,
                             position_ids=torch.arange(n).expand(3, n).clone(),
                             token_fields={"old_logprobs": old, "rollout_logprobs": old - 0.25 * (rank + 1) * mask}))
    packed = pack_sequences(seqs, token_budget=64)
    metrics = attach_loss_inputs(packed, "grpo", torch.randn(3), torch.ones(3, dtype=torch.bool), 0.005, 16,
                                    tis_cap=2.0, group=group)
    result["mismatch"] = metrics["rollout/mismatch_abs_mean"]
    result["tokens"] = int(sum(int(mb.loss_mask.sum()) for mb in packed))
    result["metric_sums"] = _sum_metrics([{"loss": 0.5 + rank}, {"loss": 0.25}], group)
    # 3. a preemption signal on one rank stops both at the step boundary (flag max-reduced over the world)
    from care_megatron import runtime

    runtime.install_preemption_handlers()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)
    try:
        runtime.check_preemption()
        result["preempted"] = 0
    except runtime.PreemptionRequested as exc:
        result["preempted"] = exc.signum
    result["violations"] = list(_collective_guard.VIOLATIONS)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_step_host_collectives_run_on_the_group_device(tmp_path):
    mp.start_processes(_worker, args=(2, _port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    tokens = [r["tokens"] for r in results]
    for r in results:
        assert r["caught"], r  # the guard is live: a host tensor on the group fails
        assert r["placed"] == [2.0, 4.0]
        assert r["violations"] == ["torch.distributed.all_reduce got a host tensor (shape (2,), torch.float64) on a "
                                   "group that is NCCL on GPU: NCCL rejects CPU tensors"], r["violations"]
        assert r["normalisers"] == {"num_sequences": 7.0, "num_advantaged_sequences": 5.0, "num_tokens": 30.0,
                                   "max_response_length": 12.0}
        # token-weighted over both ranks: rank r's gap is 0.25 * (r + 1) on each of its tokens
        expected = (0.25 * tokens[0] + 0.5 * tokens[1]) / sum(tokens)
        assert r["mismatch"] == pytest.approx(expected, rel=1e-6)
        assert r["metric_sums"] == {"loss": 0.75 + 1.75, "micro_batches": 4.0}
        assert r["preempted"] == int(signal.SIGUSR1)  # rank 0 got no signal and stops too
