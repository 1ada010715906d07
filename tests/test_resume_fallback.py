"""``--resume`` past damaged checkpoints (care_megatron/checkpoint.py): a newest checkpoint that is
incomplete (no marker, a file missing or truncated) or does not load (bytes overwritten, the size
unchanged) is passed over for the previous complete one with a warning naming both; none usable is a
ConfigError on ``train.output_dir`` that names every refused checkpoint and why.

The backend here saves and loads exactly as the plain-PyTorch backend does (``torch.save`` of the
model / optimizer state dicts to the one path it is given, ``torch.load`` then ``load_state_dict``),
so a truncated or overwritten file fails in ``torch.load`` as it would in a run. The trainer-level
test at the end uses the real backend and ``care-train`` itself.
"""
import json
import logging
import random

import numpy as np
import pytest
import torch

from care_megatron import checkpoint as ckpt
from care_megatron.config import ConfigError


class FileBackend:
    """A linear model and its Adam state, checkpointed the way ``TorchBackend`` does it."""

    def __init__(self):
        self.model = torch.nn.Linear(8, 4)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.1)

    def train_step(self):
        self.optimizer.zero_grad()
        self.model(torch.randn(3, 8)).square().sum().backward()
        self.optimizer.step()

    def save_checkpoint(self, path: str) -> None:
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}, path)

    def load_checkpoint(self, path: str) -> None:
        state = torch.load(path, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def weights(self) -> torch.Tensor:
        return self.model.weight.detach().clone()


def _train_and_save(root, steps=(2, 4)):
    """Checkpoints at ``steps``; returns {step: (weights, the torch RNG draw that follows the save)}."""
    backend, saved = FileBackend(), {}
    for step in range(1, max(steps) + 1):
        backend.train_step()
        if step in steps:
            ckpt.save_checkpoint(root, step, backend, {"data": {"step": step}}, keep_last=len(steps))
            state = torch.get_rng_state()
            saved[step] = (backend.weights(), torch.rand(4), random.random(), np.random.rand())
            torch.set_rng_state(state)
    return saved


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _overwrite_middle(path):
    """Same size, garbage in the middle: the completeness marker cannot see it, loading must."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle - 64: middle + 64] = b"\xff" * 128
    path.write_bytes(bytes(data))


def _resume(root):
    fresh = FileBackend()
    torch.manual_seed(1234)  # a resumed process starts from its own seed; the checkpoint's state must win
    found = ckpt.load_latest_checkpoint(root, fresh)
    return fresh, found


def test_a_complete_checkpoint_restores_weights_rng_and_trainer_state(tmp_path):
    saved = _train_and_save(tmp_path)
    fresh, (path, state) = _resume(tmp_path)
    assert path.name == "step_000004" and state["step"] == 4 and state["data"] == {"step": 4}
    weights, draw, py_draw, np_draw = saved[4]
    assert torch.equal(fresh.weights(), weights)
    assert torch.equal(torch.rand(4), draw) and random.random() == py_draw and np.random.rand() == np_draw
    marker = json.loads((path / ckpt.MARKER).read_text())
    assert marker["step"] == 4 and marker["world_size"] == 1
    assert set(marker["files"]) == {"backend", "trainer.pt", ckpt.rng_file(0)}
    assert all(marker["files"][name] == (path / name).stat().st_size for name in marker["files"])


@pytest.mark.parametrize("damage, reason", [
    (lambda p: _truncate(p / "backend"), "backend has"),
    (lambda p: _truncate(p / "trainer.pt"), "trainer.pt has"),
    (lambda p: (p / ckpt.rng_file(0)).unlink(), "rng/rank_00000.pt is missing"),
    (lambda p: (p / ckpt.MARKER).unlink(), "no complete.json"),
    (lambda p: (p / ckpt.MARKER).write_text("{not json"), "unreadable complete.json"),
    (lambda p: _overwrite_middle(p / "backend"), "backend: "),
    (lambda p: _overwrite_middle(p / "trainer.pt"), "trainer state: "),
], ids=["truncated_backend", "truncated_trainer", "missing_rng", "no_marker", "bad_marker", "corrupt_backend",
        "corrupt_trainer"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, damage, reason):
    saved = _train_and_save(tmp_path)
    damage(tmp_path / "step_000004")
    with caplog.at_level(logging.WARNING, logger="care_megatron.checkpoint"):
        fresh, (path, state) = _resume(tmp_path)
    assert path.name == "step_000002" and state["step"] == 2
    weights, draw, _, _ = saved[2]
    assert torch.equal(fresh.weights(), weights) and torch.equal(torch.rand(4), draw)
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1
    assert "step_000004" in warning[0] and "step_000002" in warning[0] and reason in warning[0]


def test_no_usable_checkpoint_is_a_config_error_naming_each(tmp_path):
    _train_and_save(tmp_path)
    _truncate(tmp_path / "step_000004" / "backend")
    _overwrite_middle(tmp_path / "step_000002" / "backend")
    with pytest.raises(ConfigError) as info:
        _resume(tmp_path)
    assert info.value.field == "train.output_dir"
    message = str(info.value)
    assert "no usable checkpoint" in message and "\n" not in message
    assert "step_000004 (backend has" in message and "step_000002 (backend: " in message


def test_no_checkpoint_at_all_is_a_fresh_start(tmp_path):
    assert ckpt.load_latest_checkpoint(tmp_path / "checkpoints", FileBackend()) is None


def test_latest_checkpoint_skips_incomplete_ones(tmp_path):
    _train_and_save(tmp_path)
    _truncate(tmp_path / "step_000004" / "trainer.pt")
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000002"
