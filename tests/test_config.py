"""Config: example files load, bad values fail naming the field, overrides coerce types; the CLI."""
import subprocess
import sys
from pathlib import Path

import pytest

from care_megatron.cli import main
from care_megatron.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "examples" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_load(path):
    config = load_config(path)
    assert config.train.output_dir


def test_overrides_are_typed_and_nested():
    c = load_config(None, ["train.steps=7", "algorithm.name=grpo", "rollout.temperature=0.5",
                           "data.tasks=[count_shapes]", "algorithm.care={k: 2}", "parallel.fp8=null"])
    assert c.train.steps == 7 and isinstance(c.train.steps, int)
    assert c.algorithm.name == "grpo" and c.rollout.temperature == 0.5
    assert c.data.tasks == ["count_shapes"] and c.algorithm.care == {"k": 2} and c.parallel.fp8 is None
    assert c.algorithm.defaults() == {"clip_low": 0.2, "clip_high": 0.2, "kl_coef": 0.02}


@pytest.mark.parametrize("override, field", [
    ("train.steps=-1", "train.steps"),
    ("train.steps=abc", "train.steps"),
    ("algorithm.name=ppo", "algorithm.name"),
    ("rollout.top_p=1.5", "rollout.top_p"),
    ("train.stepz=3", "train.stepz"),
    ("parallel.backend=jax", "parallel.backend"),
    ("parallel.tensor_model_parallel_size=2", "parallel.backend"),
    ("parallel.sequence_parallel=true", "parallel.sequence_parallel"),
    ("algorithm.care={k: 0}", "k"),
    ("algorithm.care={kk: 2}", "algorithm.care"),
    ("data.image_backend=opencv", "data.image_backend"),
    ("model.dtype=int8", "model.dtype"),
    (("algorithm.name=dapo", "algorithm.dapo_overlong_buffer=100"), "algorithm.dapo_overlong_buffer"),
])
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(None, list(override) if isinstance(override, tuple) else [override])


def test_cli_rejects_a_bad_config_with_exit_code_2(capsys):
    assert main("train", ["train.steps=-3"]) == 2
    assert "train.steps" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["care-train", "care-sft", "care-eval"])
def test_cli_help(script):
    command = script.split("-")[1]
    out = subprocess.run([sys.executable, "-m", "care_megatron.cli", command, "--help"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--config" in out.stdout and "section.field=value" in out.stdout


def test_cli_accepts_overrides_around_options(monkeypatch):
    """Overrides may come before and after flags (argparse's intermixed parsing)."""
    import care_megatron.cli as cli

    seen = {}
    monkeypatch.setattr("care_megatron.trainer.train", lambda config, resume, progress: seen.update(
        steps=config.train.steps, name=config.algorithm.name, resume=resume, progress=progress))
    assert cli.main("train", ["train.steps=3", "--no-progress", "algorithm.name=rloo", "--resume"]) == 0
    assert seen == {"steps": 3, "name": "rloo", "resume": True, "progress": False}
