"""Records from a DataConfig (sizes, disjoint held-out set, determinism) and exact resume of PromptIterator."""
import json
from collections import Counter

import pytest

from care_megatron.config.schema import DataConfig
from care_megatron.data.dataset import PromptIterator, _fingerprint, build_datasets, build_records, share_out
from care_megatron.data.schema import Record, write_jsonl
from care_megatron.data.synthetic import generate


def test_share_out():
    assert share_out(10, 3) == [4, 3, 3]
    assert share_out(2, 4) == [1, 1, 0, 0]
    assert sum(share_out(2001, 5)) == 2001


def test_build_records_sizes_mix_and_disjoint_eval():
    config = DataConfig(train_size=103, eval_size=21, difficulty=[1, 2], seed=3)
    splits = build_records(config)
    assert len(splits.train) == 103 and len(splits.eval) == 21
    per_task_train = Counter(r.source for r in splits.train)
    assert per_task_train == {"count_shapes": 21, "tallest_bar": 21, "triangle_angle": 21, "compare_lengths": 20,
                              "easy_vqa": 20}
    assert Counter(r.source for r in splits.eval) == {"count_shapes": 5, "tallest_bar": 4, "triangle_angle": 4,
                                                      "compare_lengths": 4, "easy_vqa": 4}
    assert {r.metadata["difficulty"] for r in splits.train if "difficulty" in r.metadata} == {1, 2}
    train_keys = {_fingerprint(r) for r in splits.train}
    assert not train_keys & {_fingerprint(r) for r in splits.eval}
    assert not {r.id for r in splits.train} & {r.id for r in splits.eval}
    assert all(r.metadata["split"] == "test" for r in splits.eval if r.source == "easy_vqa")
    assert [r.images[0].size for r in splits.train if r.source == "count_shapes"][0] == (56, 56)
    # Same config, same records; another seed, other records.
    again_train, again_eval = build_datasets(config)
    assert [r.id for r in again_train] == [r.id for r in splits.train]
    assert [r.answer for r in again_eval] == [r.answer for r in splits.eval]
    other = build_records(DataConfig(train_size=103, eval_size=21, difficulty=[1, 2], seed=4))
    assert [r.answer for r in other.train] != [r.answer for r in splits.train]


def test_jsonl_task_and_unknown_task(tmp_path):
    write_jsonl(generate("triangle_angle", 30, seed=9, difficulty=2), tmp_path / "mix.jsonl")
    config = DataConfig(tasks=[f"jsonl:{tmp_path / 'mix.jsonl'}", "count_shapes"], train_size=40, eval_size=10)
    splits = build_records(config)
    from_file_train = [r for r in splits.train if r.source == "triangle_angle"]
    from_file_eval = [r for r in splits.eval if r.source == "triangle_angle"]
    assert len(from_file_train) == 20 and len(from_file_eval) == 5
    assert not {r.id for r in from_file_train} & {r.id for r in from_file_eval}
    assert splits.reports[0].loaded == 30
    with pytest.raises(ValueError, match="data.tasks"):
        build_records(DataConfig(tasks=["count_cats"]))


def _records(n):
    return [Record(f"r{i}", "t", [], f"q{i}", str(i)) for i in range(n)]


@pytest.mark.parametrize("stop_after", [0, 1, 3, 4, 7])
def test_prompt_iterator_resume_is_exact(stop_after):
    records = _records(10)
    uninterrupted = PromptIterator(records, prompts_per_step=4, seed=11)
    reference = [[r.id for r in next(uninterrupted)] for _ in range(12)]
    first = PromptIterator(records, prompts_per_step=4, seed=11)
    seen = [[r.id for r in next(first)] for _ in range(stop_after)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
    resumed = PromptIterator(records, prompts_per_step=4, seed=0)  # seed comes from the state
    resumed.load_state_dict(state)
    seen += [[r.id for r in resumed.next_batch()] for _ in range(12 - stop_after)]
    assert seen == reference


def test_prompt_iterator_epochs():
    records = _records(10)
    iterator = PromptIterator(records, prompts_per_step=5, seed=1)
    epoch0 = [r.id for r in next(iterator) + next(iterator)]
    epoch1 = [r.id for r in next(iterator) + next(iterator)]
    assert sorted(epoch0) == sorted(epoch1) == sorted(r.id for r in records)  # each record once per epoch
    assert epoch0 != epoch1  # reshuffled
    assert iterator.state_dict()["epoch"] == 1
    # A step that crosses the epoch boundary takes the rest of one epoch, then the next one's start.
    crossing = PromptIterator(records, prompts_per_step=4, seed=1)
    flat = [r.id for _ in range(5) for r in next(crossing)]
    assert sorted(flat[:10]) == sorted(flat[10:]) == sorted(r.id for r in records)
    unshuffled = PromptIterator(records, prompts_per_step=3, seed=1, shuffle=False)
    assert [r.id for r in next(unshuffled)] == ["r0", "r1", "r2"]


def test_prompt_iterator_rejects_mismatched_state():
    iterator = PromptIterator(_records(10), prompts_per_step=4)
    state = iterator.state_dict()
    with pytest.raises(ValueError, match="dataset changed"):
        PromptIterator(_records(9), prompts_per_step=4).load_state_dict(state)
    with pytest.raises(ValueError):
        PromptIterator([], prompts_per_step=4)
