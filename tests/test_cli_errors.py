"""Errors a user can act on: a bad value found after start-up (unknown task, missing ``train.init_from``,
missing data file, unreadable image folder) ends like a config error does, one line on stderr naming
the field and the fix and exit status 2, with the traceback behind ``--debug`` / ``CARE_DEBUG=1``;
``rollout.group_size=1`` is a config error for every (group-relative) method."""
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from care_megatron.algorithm.advantages import AdvantageInputs, get_advantage_fn
from care_megatron.algorithm.care import CareConfig
from care_megatron.cli import DEBUG_ENV, main
from care_megatron.config import ConfigError, load_config
from care_megatron.config.schema import ALGORITHMS, DataConfig
from care_megatron.data.dataset import build_records, build_sft_records
from care_megatron.data.schema import write_jsonl
from care_megatron.data.synthetic import generate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _preemption_handlers_restored(monkeypatch):
    """``care-train`` run in-process installs its preemption handlers; leave this process's as they were."""
    from care_megatron import runtime

    monkeypatch.setattr(runtime, "_preemption", {"installed": False, "signal": 0})
    previous = {sig: signal.getsignal(sig) for sig in runtime.PREEMPTION_SIGNALS}
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if "invalid configuration" in line]


def _jsonl_with_images(tmp_path) -> Path:
    """A unified-schema file whose records' images live in ``tmp_path/images`` (write_jsonl's layout)."""
    path = tmp_path / "mix.jsonl"
    write_jsonl(generate("count_shapes", 6, seed=1, difficulty=1), path)
    assert any((tmp_path / "images").iterdir())
    return path


# ---------------------------------------------------------------- rollout.group_size = 1


def test_a_group_of_one_gives_every_method_zero_advantages():
    """Why group_size=1 is refused: each method baselines a rollout against its group, so one
    rollout per prompt gives A = 0 for every rollout, whatever the rewards."""
    n = 4
    batch = AdvantageInputs(group_index=torch.arange(n), rewards=torch.tensor([1.0, 0.1, 0.0, 1.0]),
                            correct=torch.tensor([True, False, False, True]), think_lengths=torch.tensor([3, 4, 5, 6]),
                            answer_lengths=torch.ones(n, dtype=torch.long), think_embeddings=torch.randn(n, 8),
                            sequence_logprobs=torch.zeros(n), reflected_from=torch.full((n,), -1),
                            response_lengths=torch.full((n,), 10))
    for name in ALGORITHMS:
        advantages, _ = get_advantage_fn(name)(batch, CareConfig() if name == "care" else None)
        assert torch.equal(advantages, torch.zeros(n)), name


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_group_size_one_is_a_config_error(algorithm):
    with pytest.raises(ConfigError, match="rollout.group_size") as info:
        load_config(None, [f"algorithm.name={algorithm}", "rollout.group_size=1"])
    assert info.value.field == "rollout.group_size" and "2 or more" in str(info.value)
    copy = pickle.loads(pickle.dumps(info.value))  # as it crosses processes
    assert (type(copy), copy.field, str(copy)) == (ConfigError, info.value.field, str(info.value))
    assert load_config(None, [f"algorithm.name={algorithm}", "rollout.group_size=2"]).rollout.group_size == 2


def test_group_size_one_ends_the_command_with_status_2(capsys):
    assert main("train", ["rollout.group_size=1"]) == 2
    [line] = _error_lines(capsys)
    assert "rollout.group_size" in line and "2 or more" in line


# ---------------------------------------------------------------- where the bad value is found


def test_unknown_task_missing_file_and_unreadable_images_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="unknown task 'count_cats'") as info:
        build_records(DataConfig(tasks=["count_cats"]))
    assert info.value.field == "data.tasks"
    with pytest.raises(ConfigError, match="cannot read .*missing.jsonl") as info:
        build_records(DataConfig(tasks=["count_shapes"], eval_tasks=[f"jsonl:{tmp_path / 'missing.jsonl'}"]))
    assert info.value.field == "data.eval_tasks"
    with pytest.raises(ConfigError, match="cannot read") as info:
        build_sft_records(DataConfig(sft_tasks=[f"sharegpt:{tmp_path / 'no_such_folder'}"]))
    assert info.value.field == "data.sft_tasks"
    path = _jsonl_with_images(tmp_path)
    assert len(build_records(DataConfig(tasks=[f"jsonl:{path}"], train_size=4, eval_size=2)).train) == 4
    shutil.rmtree(tmp_path / "images")  # every record's image is gone: the task would silently drop out
    with pytest.raises(ConfigError, match="no usable record .*unreadable_image=6") as info:
        build_records(DataConfig(tasks=["count_shapes", f"jsonl:{path}"], train_size=4, eval_size=2))
    assert info.value.field == "data.tasks" and "image paths / folder" in str(info.value)


def test_missing_init_from_ends_care_train_with_one_line(tmp_path, capsys):
    missing = tmp_path / "sft"
    assert main("train", [f"train.init_from={missing}", f"train.output_dir={tmp_path}"]) == 2
    [line] = _error_lines(capsys)
    assert line.startswith("care-train: invalid configuration: config field 'train.init_from'")
    assert str(missing) in line and "run care-sft first" in line


def test_missing_sft_data_file_ends_care_sft_with_one_line(tmp_path, capsys):
    missing = tmp_path / "cold.jsonl"
    assert main("sft", [f"data.sft_tasks=[jsonl:{missing}]", f"train.output_dir={tmp_path}"]) == 2
    [line] = _error_lines(capsys)
    assert "config field 'data.sft_tasks'" in line and str(missing) in line and "fix the path" in line


def test_unreadable_image_folder_ends_care_eval_with_one_line(tmp_path, capsys):
    path = _jsonl_with_images(tmp_path)
    shutil.rmtree(tmp_path / "images")
    assert main("eval", [f"data.tasks=[jsonl:{path}]", "data.train_size=2", "data.eval_size=2",
                         f"train.output_dir={tmp_path}"]) == 2
    [line] = _error_lines(capsys)
    assert "config field 'data.tasks'" in line and "unreadable_image" in line


# ---------------------------------------------------------------- the traceback on request, other errors untouched


def test_debug_flag_and_env_keep_the_traceback(tmp_path, monkeypatch):
    args = [f"train.init_from={tmp_path / 'sft'}", f"train.output_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="train.init_from"):
        main("train", [*args, "--debug"])
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ConfigError, match="train.init_from"):
        main("train", args)
    with pytest.raises(ValueError, match="train.steps"):  # the load-time errors too
        main("train", ["train.steps=-1"])
    monkeypatch.setenv(DEBUG_ENV, "0")
    assert main("train", args) == 2


def test_other_exceptions_are_not_swallowed(tmp_path, monkeypatch):
    import care_megatron.trainer as trainer

    def broken(*args, **kwargs):
        raise ValueError("a bug, not a bad value")

    monkeypatch.setattr(trainer, "train", broken)
    with pytest.raises(ValueError, match="a bug"):
        main("train", [f"train.output_dir={tmp_path}"])


def test_console_script_prints_one_line_and_exits_2(tmp_path):
    """The real process: exit status 2, the error as stderr's only line about it, no traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(DEBUG_ENV, None)
    done = subprocess.run([sys.executable, "-m", "care_megatron.cli", "train", "data.tasks=[count_cats]",
                           f"train.output_dir={tmp_path}", "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].startswith(
        "care-train: invalid configuration: config field 'data.tasks': unknown task 'count_cats'; valid: count_shapes")
