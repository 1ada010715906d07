"""The embedded default (examples/configs/tiny_cpu.yaml) and the previous one (tiny_cpu_shapes.yaml) can
show learning: each held-out set is big enough that a 0.10 gain is several standard errors, and every
held-out record is new to training."""
import math
from pathlib import Path

import pytest

from care_megatron.config import load_config
from care_megatron.data.dataset import _fingerprint, build_records

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["tiny_cpu.yaml", "tiny_cpu_shapes.yaml"])
def test_default_heldout_set_is_large_and_disjoint(name):
    config = load_config(ROOT / "examples/configs" / name, [])
    splits = build_records(config.data)
    # worst case p = 0.5: standard error of a held-out accuracy sqrt(p (1 - p) / n) <= 0.03
    assert len(splits.eval) == config.data.eval_size
    assert math.sqrt(0.25 / len(splits.eval)) <= 0.03
    train = {_fingerprint(r) for r in splits.train}
    assert not any(_fingerprint(r) in train for r in splits.eval)
    assert len({_fingerprint(r) for r in splits.eval}) == len(splits.eval)  # no question counted twice
    # each evaluation checkpoint is a multiple of eval_every, so the step-0 (SFT) and final accuracies exist
    assert config.train.eval_every and config.train.steps % config.train.eval_every == 0
