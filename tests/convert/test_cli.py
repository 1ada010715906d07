"""The converters end to end: HF dir -> Megatron checkpoint -> HF dir, bit-exact, loadable, same logits."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from checkpoints_convert.hf_to_megatron import convert_hf_to_megatron
from checkpoints_convert.hf_to_megatron import main as hf_to_megatron_main
from checkpoints_convert.megatron_to_hf import convert_megatron_to_hf
from conftest import ARCH_VARIANTS
from tiny_models import text_inputs, vlm_inputs

WORKER = os.path.join(os.path.dirname(__file__), "megatron_worker.py")


def _all_tensors(directory):
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(json.load(open(index))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    merged = {}
    for name in files:
        merged.update(load_file(os.path.join(directory, name)))
    return merged


def _load(directory, arch):
    cls = AutoModelForImageTextToText if arch.endswith("_vl") else AutoModelForCausalLM
    return cls.from_pretrained(directory, dtype=torch.float32).eval()


def _assert_same_model(source_dir, converted_dir, arch):
    original, converted = _all_tensors(source_dir), _all_tensors(converted_dir)
    assert sorted(original) == sorted(converted)
    for name in original:
        assert torch.equal(original[name], converted[name]), name
    a, b = _load(source_dir, arch), _load(converted_dir, arch)
    inputs = vlm_inputs(a) if arch.endswith("_vl") else text_inputs()
    with torch.no_grad():
        assert torch.equal(a(**inputs).logits, b(**inputs).logits)


@pytest.mark.parametrize("arch,tie", ARCH_VARIANTS)
def test_legacy_tp2_pp2_round_trip_loads_in_transformers(saved_model_dirs, tmp_path, arch, tie):
    source = saved_model_dirs(arch, tie)
    metadata = convert_hf_to_megatron(source, str(tmp_path / "mg"), tp=2, pp=2, fmt="legacy", show_progress=False)
    assert sorted(os.listdir(tmp_path / "mg" / "release")) == ["mp_rank_00_000", "mp_rank_00_001",
                                                               "mp_rank_01_000", "mp_rank_01_001"]
    assert metadata["padded_vocab_size"] == 512
    files = convert_megatron_to_hf(str(tmp_path / "mg"), str(tmp_path / "hf"), max_shard_bytes=200_000,
                                   show_progress=False)
    assert len(files) > 1  # exercised the multi-shard index path
    _assert_same_model(source, str(tmp_path / "hf"), arch)


def test_legacy_virtual_pipeline_and_te_names(saved_model_dirs, tmp_path):
    source = str(tmp_path / "source")
    shutil.copytree(saved_model_dirs("qwen3_vl", False), source)
    assets = {"preprocessor_config.json": '{"patch_size": 16}', "chat_template.jinja": "{{ messages }}",
              "tokenizer_config.json": "{}"}
    for name, text in assets.items():
        with open(os.path.join(source, name), "w") as handle:
            handle.write(text)
    convert_hf_to_megatron(source, str(tmp_path / "mg"), tp=1, pp=2, vp=2, fmt="legacy", layernorm_naming="te",
                           show_progress=False)
    payload = torch.load(tmp_path / "mg" / "release" / "mp_rank_00_001" / "model_optim_rng.pt", weights_only=True)
    assert sorted(k for k in payload if k.startswith("model")) == ["model0", "model1"]
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in payload["model1"]
    convert_megatron_to_hf(str(tmp_path / "mg"), str(tmp_path / "hf"), show_progress=False)
    for name, text in assets.items():  # tokenizer / processor files travel with the checkpoint
        assert open(tmp_path / "hf" / name).read() == text
    _assert_same_model(source, str(tmp_path / "hf"), "qwen3_vl")


def test_cli_reports_clear_errors(saved_model_dirs, tmp_path, capsys):
    source = saved_model_dirs("qwen2", False)
    assert hf_to_megatron_main(["--hf-dir", source, "--out", str(tmp_path / "x"), "--tp", "3", "--no-progress"]) == 2
    assert "tp=3 must divide" in capsys.readouterr().err
    assert hf_to_megatron_main(["--hf-dir", source, "--out", str(tmp_path / "x"), "--pp", "8", "--no-progress"]) == 2
    assert "cannot place 4 layers" in capsys.readouterr().err
    assert hf_to_megatron_main(["--hf-dir", str(tmp_path), "--out", str(tmp_path / "x"), "--no-progress"]) == 2


def _run_worker(*args, timeout=300):
    result = subprocess.run([sys.executable, WORKER, *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def megatron_worker_run(saved_model_dirs, tmp_path_factory):
    """One worker process (one Megatron import) for the names check and every torch_dist round trip."""
    root = tmp_path_factory.mktemp("torch_dist")
    args = ["names", str(root / "names.json")]
    for arch, tie in ARCH_VARIANTS:
        args += [saved_model_dirs(arch, tie), str(root / f"{arch}_{tie}_mg"), str(root / f"{arch}_{tie}_hf"), "2"]
    _run_worker(*args)
    return root


def test_mapping_names_match_megatron_gpt_model(megatron_worker_run):
    """Our TP=1 names and shapes == megatron-core 0.16.1 GPTModel (local spec) state_dict, per architecture."""
    report = json.loads((megatron_worker_run / "names.json").read_text())
    assert len(report) == 4
    for variant, sides in report.items():
        assert sides["ours"] == sides["megatron"], variant


def test_checkpoint_converted_under_release_019_reads_with_0_16_or_is_refused(saved_model_dirs, tmp_path):
    """hf_to_megatron saving the way megatron-core 0.19 saves (no ``common.pt`` from the release) still
    writes ``common.pt``, so megatron_to_hf on megatron-core 0.16.1 (Python 3.11) reads it back exactly;
    without that file the read is refused with a message naming both releases."""
    source = saved_model_dirs("qwen2_5_vl", False)
    refusal = tmp_path / "refusal.txt"
    _run_worker("release_019", source, str(tmp_path / "mg"), str(tmp_path / "hf"), str(refusal))
    _assert_same_model(source, str(tmp_path / "hf"), "qwen2_5_vl")
    message = refusal.read_text()
    assert "common.pt" in message and "0.19" in message and "0.16.1" in message, message


def test_torch_dist_round_trip(saved_model_dirs, megatron_worker_run):
    """hf_to_megatron (torch_dist, TP=2 padding) -> megatron_to_hf for every architecture."""
    root = megatron_worker_run
    for arch, tie in ARCH_VARIANTS:
        assert os.path.exists(root / f"{arch}_{tie}_mg" / "release" / "metadata.json")
        meta = json.loads((root / f"{arch}_{tie}_mg" / "conversion.json").read_text())
        assert meta["format"] == "torch_dist" and meta["padded_vocab_size"] == 512
        _assert_same_model(saved_model_dirs(arch, tie), str(root / f"{arch}_{tie}_hf"), arch)
