"""tools/bench_throughput.py on CPU with the tiny model: the phase table is complete and its times are
consistent (a smoke test: no speed is asserted)."""
import json
from pathlib import Path

import pytest
from _tool_loader import load_tool

from care_megatron.trainer import RL_PHASES

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["data.tasks=[count_shapes,compare_lengths]", "data.train_size=8", "data.eval_size=0",
         "data.prompts_per_step=2", "train.prompts_per_update=1", "rollout.group_size=4", "rollout.max_new_tokens=6",
         "train.micro_batch_tokens=2048"]


@pytest.fixture(scope="module")
def bench():
    return load_tool("bench_throughput")


def test_phase_groups_partition_rl_phases(bench):
    members = [p for group in bench.PHASE_GROUPS.values() for p in group]
    assert sorted(members) == sorted(RL_PHASES) and len(members) == len(set(members))


def test_tiny_cpu_smoke_with_compare(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = bench.main(["--config", str(ROOT / "examples/configs/tiny_cpu.yaml"), *SMALL, "--shape", "tiny",
                         "--steps", "1", "--warmup", "0", "--compare", "algorithm.name=grpo", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    reports = result["reports"]
    assert list(reports) == ["base", "algorithm.name=grpo"]
    assert reports["base"]["algorithm"] == "care" and reports["algorithm.name=grpo"]["algorithm"] == "grpo"
    for report in reports.values():
        assert set(report["phases"]) == set(RL_PHASES)
        assert set(report["groups"]) == set(bench.PHASE_GROUPS) | {"other"}
        assert report["step_seconds"] > 0
        for phase in ("generate", "logprobs", "reference_logprobs", "train", "update_weights"):
            assert report["phases"][phase]["entered"] == 1 and report["phases"][phase]["seconds"] > 0, phase
        for phase, row in report["phases"].items():
            assert row["seconds"] >= 0 and (row["entered"] > 0 or row["seconds"] == 0), phase
        # the groups and "other" add up to the measured step
        total = sum(g["seconds"] for g in report["groups"].values())
        assert total == pytest.approx(report["step_seconds"], rel=1e-6)
        tokens = report["tokens_per_step"]
        assert 0 < tokens["generated"] <= 2 * 4 * 6 + 6 * 4  # rollouts (+ at most one RGR resample per group)
        assert tokens["train"] == tokens["reference_pass"] > tokens["generated"]  # prompts are in the packs
        train = report["groups"]["train"]
        assert train["tokens_per_s"] == pytest.approx(tokens["train"] / report["phases"]["train"]["seconds"])
        assert train["tflops_per_s"] == pytest.approx(
            6 * report["parameters"] * tokens["train"] / report["phases"]["train"]["seconds"] / 1e12)
        assert train["mfu"] is None  # no peak known on CPU unless --peak-tflops is given
        assert report["phases"]["train"]["peak_memory_bytes"] > 0
    table = capsys.readouterr().out
    for group in [*bench.PHASE_GROUPS, "other", "step", "train MFU", "dominant"]:
        assert group in table
    assert "step time algorithm.name=grpo / base" in table


def test_kernel_backend_before_after_gives_the_same_run(bench, capsys):
    """The in-place torch chunk ops (and the skipped backward of an unread entropy) against the textbook
    reference in one invocation: two RL steps, so the second step runs on weights the first update
    produced through each path; every logged metric (loss, gradient norm, rewards, KL...) is the same."""
    result = bench.main(["--config", str(ROOT / "examples/configs/tiny_cpu.yaml"), *SMALL, "train.threads=1",
                         "--shape", "tiny", "--steps", "2", "--warmup", "0", "--compare-kernel-backend", "reference"])
    reports = result["reports"]
    assert list(reports) == ["base", "kernels=reference"]
    base, reference = reports["base"]["metrics"], reports["kernels=reference"]["metrics"]
    timing = {k for k in base if k.startswith("timing/") or k.startswith("memory/") or k.startswith("throughput/")}
    assert {k: v for k, v in base.items() if k not in timing} == {k: v for k, v in reference.items() if k not in timing}
    assert base["grad_norm"] > 0 and "entropy" in base
    assert "last-step metrics of base and kernels=reference: identical" in capsys.readouterr().out


def test_named_shapes_build_the_released_layer_sizes(bench):
    from care_megatron.models.registry import build_hf_config

    name = bench.register_shape("qwen2_5_vl_7b", "qwen2_5_vl")
    config = build_hf_config(name)
    text = config.text_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.num_attention_heads,
            text.num_key_value_heads) == (3584, 18944, 28, 28, 4)
    assert sum(text.rope_parameters["mrope_section"]) * 2 == text.hidden_size // text.num_attention_heads
    assert config.vision_config.out_hidden_size == 3584
    q3 = build_hf_config(bench.register_shape("qwen3_vl_8b", "qwen2_5_vl"))
    assert q3.model_type == "qwen3_vl" and q3.text_config.head_dim == 128
    assert sum(q3.text_config.rope_parameters["mrope_section"]) * 2 == 128
    assert bench.register_shape("tiny", "qwen3_vl") == "tiny_qwen3_vl"


def test_weight_sync_bench_smoke(tmp_path):
    """tools/bench_weight_sync.py on a tiny shape: every path timed, the rollout model ends equal to the
    trainer's (the tool checks it and exits otherwise)."""
    sync = load_tool("bench_weight_sync")
    report = sync.main(["--device", "cpu", "--hidden", "64", "--layers", "2", "--vocab", "256", "--repeats", "1",
                        "--bucket-mb", "1", "--json", str(tmp_path / "sync.json")])
    assert set(report["results"]) == {"plain_copy", "fresh_copy", "export_only", "export_update_hf",
                                      "export_update_hf_copies", "torch_export_update_hf", "flattened_bucket",
                                      "flattened_bucket_reused"}
    for row in report["results"].values():
        assert row["seconds"] > 0 and row["GB_per_s"] == pytest.approx(report["bytes"] / row["seconds"] / 1e9)
    assert json.loads((tmp_path / "sync.json").read_text())["bytes"] == report["bytes"]


def test_parse_compare_takes_a_config_overrides_and_kernels(bench):
    assert bench.parse_compare(["a.yaml", "x.y=1"]) == ("a.yaml", ["x.y=1"], None)
    assert bench.parse_compare(["train.group_by_length=false", "kernels=reference"]) == (
        None, ["train.group_by_length=false"], "reference")
    with pytest.raises(SystemExit, match="kernels=fast"):
        bench.parse_compare(["kernels=fast"])
