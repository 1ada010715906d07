"""The update schedule's pieces (``care_megatron/training/updates.py``, docs/algorithm.md section 6) on
hand cases: which sequences each optimizer update takes, how many updates a step has (also across
data-parallel ranks), how the updates' reports merge, the step's ratio metrics, and the config errors."""
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from care_megatron.data.batch import Sequence
from care_megatron.data.packing import pack_sequences
from care_megatron.metrics import ppo_ratio_metrics
from care_megatron.training.base import StepResult
from care_megatron.training.updates import (merge_update_results, minibatch_count, minibatch_sequences,
                                            pack_minibatch, run_updates)


# ------------------------------------------------------------------------------- minibatch_sequences
@pytest.mark.parametrize("groups,parts,expected", [
    # one update: every sequence, in order
    ([0, 0, 1, 1, 1], 1, [[0, 1, 2, 3, 4]]),
    # uneven groups (3, 2, 4, 1 sequences): whole groups, two groups per update
    ([0, 0, 0, 1, 1, 2, 2, 2, 2, 3], 2, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]),
    # 4 groups in 3 updates: the first update takes the extra group
    ([0, 0, 1, 1, 2, 2, 3, 3], 3, [[0, 1, 2, 3], [4, 5], [6, 7]]),
    # RGR rows appended at the end of the list travel with their group (rows 8 -> group 0, 9 -> group 1)
    ([0, 0, 1, 1, 2, 2, 3, 3, 0, 1], 2, [[0, 1, 2, 3, 8, 9], [4, 5, 6, 7]]),
    ([0, 0, 1, 1, 2, 2, 3, 3, 0, 3], 4, [[0, 1, 8], [2, 3], [4, 5], [6, 7, 9]]),
    # DAPO keeps groups 0, 2, 5 and refills group 7: non-contiguous ids, in order of first appearance
    ([0, 0, 2, 2, 5, 5, 7, 7], 2, [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ([5, 5, 0, 0, 9, 9, 2, 2], 2, [[0, 1, 2, 3], [4, 5, 6, 7]]),
    # one update per group
    ([3, 1, 1, 3, 2], 3, [[0, 3], [1, 2], [4]]),
])
def test_minibatch_sequences_hand_cases(groups, parts, expected):
    assert minibatch_sequences(groups, parts) == expected


def test_minibatch_sequences_rejects_impossible_splits():
    with pytest.raises(ValueError, match="num_minibatches must be >= 1"):
        minibatch_sequences([0, 0, 1], 0)
    with pytest.raises(ValueError, match="3 mini-batches need at least as many prompt groups, got 2"):
        minibatch_sequences([0, 0, 1], 3)


# ------------------------------------------------------------------------------- minibatch_count
@pytest.mark.parametrize("groups,configured,expected", [(4, 2, 2), (4, 4, 4), (2, 4, 2), (1, 3, 1), (0, 2, 1)])
def test_minibatch_count_single_process(groups, configured, expected):
    assert minibatch_count(groups, configured) == expected


def _count_worker(rank, world, port, out_dir, groups, configured):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    counts = [minibatch_count(g, configured, dist.group.WORLD) for g in groups[rank]]
    torch.save(counts, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_minibatch_count_agrees_across_data_parallel_ranks(tmp_path):
    """Every update is a collective over the data-parallel group, so a rank that holds fewer prompt
    groups (DAPO ran out of refills) lowers the count for every rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    groups = {0: [4, 3, 2], 1: [4, 1, 2]}  # three calls, the groups each rank holds at each
    mp.start_processes(_count_worker, args=(2, port, str(tmp_path), groups, 2), nprocs=2, join=True,
                       start_method="spawn")
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == [2, 1, 2]


# ------------------------------------------------------------------------------- pack_minibatch
def _sequence(length: int, sequence_id: int) -> Sequence:
    mask = torch.zeros(length, dtype=torch.bool)
    mask[2:] = True
    return Sequence(input_ids=torch.arange(length) + 10 * sequence_id, loss_mask=mask,
                    region_ids=torch.zeros(length, dtype=torch.long), sequence_id=sequence_id,
                    position_ids=torch.arange(length).expand(3, length).clone())


def test_pack_minibatch_numbers_sequences_in_the_step_and_packs_only_its_own():
    sequences = [_sequence(4 + i, i) for i in range(6)]
    packed = pack_minibatch(sequences, [4, 1, 5], lambda seqs: pack_sequences(seqs, token_budget=12))
    assert len(packed) >= 2  # more than one micro-batch, each renumbered
    seen = []
    for mb in packed:
        bounds = mb.cu_seqlens.tolist()
        for k, row in enumerate(mb.sequence_indices.tolist()):
            assert torch.equal(mb.input_ids[bounds[k]:bounds[k + 1]], sequences[row].input_ids)
            seen.append(row)
    assert sorted(seen) == [1, 4, 5]


# ------------------------------------------------------------------------------- merging the reports
def _result(loss, grad_norm, lr, metrics, skipped=False):
    return StepResult(loss=loss, grad_norm=grad_norm, learning_rate=lr, skipped=skipped, metrics=metrics)


FIRST = {"loss": 1.0, "pg_loss": 0.75, "kl": 0.5, "count/tokens/all": 10.0, "count/clipped/all": 2.0,
         "count/response_tokens": 12.0, "count/ratio_sum": 13.0, "count/log_ratio_sum": 0.5, "min/ratio": 0.9,
         "max/ratio": 1.5, "micro_batches": 2.0}
SECOND = {"loss": 3.0, "pg_loss": 2.25, "kl": 1.5, "count/tokens/all": 30.0, "count/clipped/all": 3.0,
          "count/response_tokens": 8.0, "count/ratio_sum": 7.0, "count/log_ratio_sum": -1.5, "min/ratio": 0.6,
          "max/ratio": 1.25, "micro_batches": 1.0}


def test_merge_update_results_hand_values():
    merged = merge_update_results([_result(1.0, 2.0, 0.1, FIRST), _result(3.0, 5.0, 0.2, SECOND)])
    assert (merged.loss, merged.grad_norm, merged.learning_rate, merged.skipped) == (2.0, 3.5, 0.2, False)
    assert merged.metrics == {
        "loss": 2.0, "pg_loss": 1.5, "kl": 1.0,  # normalised per update: the mean over updates
        "count/tokens/all": 40.0, "count/clipped/all": 5.0, "count/response_tokens": 20.0,  # counts: summed
        "count/ratio_sum": 20.0, "count/log_ratio_sum": -1.0,
        "min/ratio": 0.6, "max/ratio": 1.5, "micro_batches": 3.0, "ppo/updates": 2.0, "ppo/skipped_updates": 0.0}


def test_merge_update_results_counts_skipped_updates():
    nan = float("nan")
    merged = merge_update_results([_result(1.0, 2.0, 0.1, FIRST), _result(nan, nan, 0.1, {}, skipped=True),
                                   _result(3.0, 5.0, 0.2, SECOND)])
    # loss and gradient norm over the applied updates; the step counts as skipped for the bad-step guard
    assert (merged.loss, merged.grad_norm, merged.skipped) == (2.0, 3.5, True)
    assert merged.metrics["ppo/updates"] == 3.0 and merged.metrics["ppo/skipped_updates"] == 1.0
    assert merged.metrics["pg_loss"] == pytest.approx(3.0 / 3)  # averaged over every update taken
    assert merged.metrics["count/clipped/all"] == 5.0
    none = merge_update_results([_result(nan, nan, 0.1, {}, skipped=True)])
    assert math.isnan(none.loss) and math.isnan(none.grad_norm) and none.skipped
    with pytest.raises(ValueError, match="at least one update"):
        merge_update_results([])


def test_run_updates_takes_one_train_step_per_minibatch_and_epoch():
    calls = []

    class Backend:
        def train_step(self, micro_batches, loss_fn, normalisers):
            calls.append((micro_batches, normalisers["n"]))
            return _result(float(normalisers["n"]), 1.0, 0.1, {"count/tokens/all": 1.0})

    merged = run_updates(Backend(), [["a"], ["b", "c"]], [{"n": 1.0}, {"n": 3.0}], loss_fn=None, ppo_epochs=2)
    assert calls == [(["a"], 1.0), (["b", "c"], 3.0), (["a"], 1.0), (["b", "c"], 3.0)]
    assert merged.loss == 2.0 and merged.metrics["ppo/updates"] == 4.0 and merged.metrics["count/tokens/all"] == 4.0


# ------------------------------------------------------------------------------- ratio metrics
def test_ppo_ratio_metrics_hand_values():
    merged = merge_update_results([_result(1.0, 2.0, 0.1, FIRST), _result(3.0, 5.0, 0.2, SECOND)])
    assert ppo_ratio_metrics(merged.metrics) == {"ppo/ratio_mean": 20.0 / 20.0, "ppo/approx_kl": 1.0 / 20.0,
                                                 "ppo/ratio_min": 0.6, "ppo/ratio_max": 1.5}
    assert ppo_ratio_metrics({"count/response_tokens": 0.0, "count/ratio_sum": 0.0}) == {}
    assert ppo_ratio_metrics({"loss": 1.0}) == {}
    no_tokens_seen = {"count/response_tokens": 2.0, "count/ratio_sum": 2.0, "count/log_ratio_sum": 0.0,
                      "min/ratio": math.inf, "max/ratio": -math.inf}
    assert ppo_ratio_metrics(no_tokens_seen) == {"ppo/ratio_mean": 1.0, "ppo/approx_kl": 0.0}


# ------------------------------------------------------------------------------- config errors
def test_prompts_per_update_must_divide_prompts_per_step():
    from care_megatron.config.schema import DataConfig, RunConfig, TrainConfig

    with pytest.raises(ValueError, match="config field 'train.prompts_per_update': 3 does not divide "
                                         r"data.prompts_per_step \(8\)"):
        RunConfig(data=DataConfig(prompts_per_step=8), train=TrainConfig(prompts_per_update=3))
    with pytest.raises(ValueError, match="config field 'train.prompts_per_update': must be >= 1"):
        TrainConfig(prompts_per_update=0)
    with pytest.raises(ValueError, match="config field 'train.ppo_epochs': must be >= 1"):
        TrainConfig(ppo_epochs=0)
    assert RunConfig(data=DataConfig(prompts_per_step=8), train=TrainConfig(prompts_per_update=2)).train.ppo_epochs == 1


@pytest.mark.parametrize("per_update,error", [(1, True), (2, False), (None, False)])
def test_prompts_per_update_must_split_over_data_parallel_ranks(tmp_path, monkeypatch, per_update, error):
    """The trainer checks what the config cannot: each update takes prompts_per_update / DP groups on
    every data-parallel rank."""
    from pathlib import Path

    import care_megatron.training.registry as registry
    from care_megatron.config import load_config
    from care_megatron.trainer import RLTrainer

    real_build = registry.build_backend

    def two_rank_backend(*args, **kwargs):
        backend = real_build(*args, **kwargs)
        backend.data_parallel_size = 2
        return backend

    monkeypatch.setattr(registry, "build_backend", two_rank_backend)
    root = Path(__file__).resolve().parents[2]
    overrides = ["data.tasks=[count_shapes]", "data.train_size=8", "data.eval_size=0", "data.prompts_per_step=4",
                 "train.init_from=null", f"train.output_dir={tmp_path}", f"train.prompts_per_update={per_update}"
                 if per_update is not None else "train.prompts_per_update=null"]
    config = load_config(root / "examples/configs/tiny_cpu_shapes.yaml", overrides)
    if error:
        with pytest.raises(ValueError, match="config field 'train.prompts_per_update': 1 prompts per update do not "
                                             "split evenly over the data-parallel size 2"):
            RLTrainer(config, progress=False)
    else:
        trainer = RLTrainer(config, progress=False)
        assert trainer.dp_size == 2 and trainer.updates_per_epoch == 4 // (per_update or 4)
