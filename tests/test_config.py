"""Config: example files load, bad values fail naming the field, overrides coerce types; the CLI."""
import subprocess
import sys
from pathlib import Path

import pytest

from care_megatron.cli import main
from care_megatron.config import load_config
from care_megatron.config.loader import load_yaml

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


@pytest.mark.parametrize("text, expected", [
    ("1e-3", 1e-3), ("1E5", 1e5), ("+2.5e-4", 2.5e-4), ("3e+2", 300.0), (".5", 0.5), ("1.0e5", 1e5), ("2", 2.0),
])
def test_float_overrides_take_every_number_spelling(text, expected):
    """PyYAML (YAML 1.1) reads 1e-3 / 1E5 / 3e+2 / 1.0e5 as strings; the loader reads them as numbers."""
    c = load_config(None, [f"train.lr={text}", f"algorithm.care={{neg_scale: {text}}}"])
    assert c.train.lr == expected and type(c.train.lr) is float
    assert c.algorithm.care == {"neg_scale": expected}


def test_negative_scientific_notation_is_a_number():
    """-2.5e-4 reaches the field as a number: the error is the field's range check, not a type error."""
    with pytest.raises(ValueError, match=r"train\.lr.*must be > 0"):
        load_config(None, ["train.lr=-2.5e-4"])
    assert load_yaml("x: -2.5e-4") == {"x": -2.5e-4} and load_yaml("-2.5E4") == -25000.0


def test_int_fields_stay_int_and_accept_integral_scientific_notation():
    c = load_config(None, ["train.steps=7", "train.sft_steps=3e+2", "train.save_every=1E1"])
    assert (c.train.steps, c.train.sft_steps, c.train.save_every) == (7, 300, 10)
    assert all(type(v) is int for v in (c.train.steps, c.train.sft_steps, c.train.save_every))
    with pytest.raises(ValueError, match=r"train\.steps.*integer"):
        load_config(None, ["train.steps=2.5e-1"])


@pytest.mark.parametrize("override, field", [("train.lr=1e-3x", "train.lr"), ("train.lr=e5", "train.lr"),
                                             ("rollout.top_p=abc", "rollout.top_p"), ("train.lr=[1e-3]", "train.lr")])
def test_non_numbers_still_fail_naming_the_field(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.") + ".*expected a number"):
        load_config(None, [override])


def test_yaml_file_numbers_in_scientific_notation(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1e-3\n  sft_lr: '2E-4'\n  steps: 5\n  grad_clip: 3e+2\n"
                    "rollout:\n  top_p: .5\n  temperature: 7E-1\n"
                    "algorithm:\n  care: {neg_scale: 1E-1, k: 2}\n"
                    "model:\n  name: tiny\n")
    c = load_config(path)
    assert (c.train.lr, c.train.sft_lr, c.train.grad_clip, c.rollout.top_p, c.rollout.temperature) == \
        (1e-3, 2e-4, 300.0, 0.5, 0.7)
    assert c.train.steps == 5 and type(c.train.steps) is int
    assert c.algorithm.care == {"neg_scale": 0.1, "k": 2} and type(c.algorithm.care["k"]) is int
    assert c.model.name == "tiny"


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
    ("data.think_tag=cot", "data.think_tag"),
    ("data.think_tag=Think", "data.think_tag"),
    (("data.think_tag=reasoning", "data.system_prompt=Reason in <think></think>."), "data.system_prompt"),
    ("data.system_prompt=Reason in <reasoning></reasoning>.", "data.system_prompt"),
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


def test_think_tag_default_values_and_tag_config():
    from care_megatron.rewards.parsing import DEFAULT_TAGS, REASONING_TAGS

    default = load_config(None, [])
    assert default.data.think_tag == "think" and default.data.tag_config is DEFAULT_TAGS
    reasoning = load_config(None, ["data.think_tag=reasoning"])
    assert reasoning.data.tag_config is REASONING_TAGS
    # a custom instruction naming the configured tag is accepted, whatever else it mentions
    ok = load_config(None, ["data.think_tag=reasoning", "data.system_prompt=Use <reasoning>, never <think>."])
    assert ok.data.system_prompt == "Use <reasoning>, never <think>."
