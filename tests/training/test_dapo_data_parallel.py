"""DAPO's refill under data parallelism (RLTrainer.dapo_refill): each rank refills toward its own share
of ``data.prompts_per_step``, and every rank draws as many prompt batches as the rank that refilled
most, so the ranks' prompt streams stay aligned (each rank slices the same global batch by its DP rank)."""
import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from care_megatron.data.dataset import PromptIterator


def _refill_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    import care_megatron.trainer as trainer_module

    dist.init_process_group("gloo", rank=rank, world_size=world)
    seen = {}

    def fake_sampling(rollouts, more, target_groups, *args):
        """Rank 1 needs two refill rounds, rank 0 none (what the real filter decides from rewards)."""
        seen["target"] = target_groups
        rounds = 2 if rank == 1 else 0
        for _ in range(rounds):
            more(1, 100)
        return rollouts, {"dapo/refill_rounds": float(rounds)}

    trainer_module.dapo_dynamic_sampling = fake_sampling
    # each refill decodes one rollout of 3 tokens
    trainer_module.generate_rollouts = lambda *args, **kwargs: [SimpleNamespace(completion=SimpleNamespace(token_ids=[1, 2, 3]))]
    prompts = PromptIterator(list(range(40)), prompts_per_step=8, seed=3)
    fake = SimpleNamespace(
        config=SimpleNamespace(data=SimpleNamespace(prompts_per_step=8),
                               rollout=SimpleNamespace(group_size=2, max_new_tokens=8),
                               algorithm=SimpleNamespace(dapo_overlong_buffer=0, dapo_overlong_penalty=1.0)),
        prompts=prompts, dp_rank=rank, dp_size=world, engine=None, tokenizer=None, reward_fn=None,
        build_prompts=lambda records: (records, records),
        backend=SimpleNamespace(data_parallel_group=dist.group.WORLD))
    _, _, refilled = trainer_module.RLTrainer.dapo_refill(fake, [], None, step=0)
    torch.save({"target": seen["target"], "next": next(prompts), "refilled": refilled},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_dapo_refill_targets_the_rank_share_and_keeps_prompt_streams_aligned(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_refill_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2))
    assert r0["target"] == r1["target"] == 4  # 8 prompts per step over 2 ranks
    assert (r0["refilled"], r1["refilled"]) == (0.0, 6.0)  # the tokens each rank's own refills decoded
    # rank 0 drew the two batches rank 1's refills drew: the next global batch is the same on both
    assert r0["next"] == r1["next"]
    reference = PromptIterator(list(range(40)), prompts_per_step=8, seed=3)
    for _ in range(2):
        next(reference)
    assert r0["next"] == next(reference)
