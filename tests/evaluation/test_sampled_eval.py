"""eval.samples: the trainer's held-out mean@N at the rollout's sampling settings (``eval_sampled/*``)."""
import types
import zlib
from pathlib import Path

import pytest
import torch

from care_megatron.config import load_config

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["data.train_size=8", "data.eval_size=6", "data.tasks=[count_shapes,tallest_bar]", "rollout.group_size=2",
         "rollout.max_new_tokens=6", "train.threads=1", "train.init_from=null", "eval.samples=3"]


def _trainer(tmp_path, *extra):
    from care_megatron.trainer import RLTrainer

    config = load_config(ROOT / "examples/configs/tiny_cpu.yaml", [*SMALL, f"train.output_dir={tmp_path}", *extra])
    trainer = RLTrainer(config, progress=False)
    # a random tiny policy answers nothing right; score a property of the decoded text instead so the
    # accuracies are not all zero (the same function for the greedy and the sampled decode)
    trainer.reward_fn = lambda text, answer, **_: types.SimpleNamespace(
        accuracy=float(zlib.crc32((text + str(answer)).encode()) % 2), format=float(len(text) % 2), reason="")
    return trainer


def test_sampled_eval_at_temperature_zero_is_the_greedy_eval(tmp_path):
    metrics = _trainer(tmp_path, "rollout.temperature=0").evaluate()
    sampled = {k[len("eval_sampled/"):]: v for k, v in metrics.items() if k.startswith("eval_sampled/")}
    greedy = {k[len("eval/"):]: v for k, v in metrics.items() if k.startswith("eval/")}
    assert set(sampled) == set(greedy) == {"accuracy", "format", "macro_accuracy", "think_length",
                                           "accuracy/count_shapes", "accuracy/tallest_bar"}
    for key, value in greedy.items():
        assert sampled[key] == pytest.approx(value, abs=1e-12), key


def test_sampled_eval_is_reproducible_and_leaves_the_global_rng_alone(tmp_path):
    trainer = _trainer(tmp_path)
    calls = []
    generate = trainer.engine.generate
    trainer.engine.generate = lambda requests, sampling: calls.append((len(requests), sampling)) or generate(requests, sampling)
    state = torch.random.get_rng_state()
    first = trainer.evaluate()
    assert torch.equal(torch.random.get_rng_state(), state)
    second = trainer.evaluate()
    assert {k: v for k, v in first.items() if k.startswith("eval_sampled/")} == \
        {k: v for k, v in second.items() if k.startswith("eval_sampled/")}
    greedy_calls = [c for c in calls if c[1].temperature == 0.0]
    sampled_calls = [c for c in calls if c[1].temperature > 0.0]
    # per evaluation: the 6 questions once greedily and 3 times each at the rollout temperature, one fixed seed
    assert sum(n for n, _ in greedy_calls) == 2 * 6 and sum(n for n, _ in sampled_calls) == 2 * 18
    assert {s.temperature for _, s in sampled_calls} == {trainer.config.rollout.temperature}
    assert len({s.seed for _, s in sampled_calls}) == 1 and sampled_calls[0][1].seed is not None
    # mean@3 of 6 questions: a multiple of 1/18
    assert first["eval_sampled/accuracy"] * 18 == pytest.approx(round(first["eval_sampled/accuracy"] * 18))


def test_eval_samples_must_be_non_negative():
    with pytest.raises(ValueError, match="eval.samples"):
        load_config(None, ["eval.samples=-1"])
