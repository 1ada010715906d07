"""Rollout weight export: HF-named full tensors from (sharded) Megatron parameters, in bounded buckets."""
import os
import re
import socket
import subprocess
import sys
import weakref

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from care_megatron.rollout.hf_engine import checkpoint_name_to_module_name
from care_megatron.models.weight_mapping import get_mapping, hf_to_megatron_rank_state_dict, hf_to_megatron_state_dicts
from care_megatron.training.megatron.weight_export import canonical_megatron_name, export_hf_weights
from conftest import ARCH_VARIANTS
from tiny_models import module_from_state_dict

WORKER = os.path.join(os.path.dirname(__file__), "export_worker.py")


def _load(directory):
    return AutoConfig.from_pretrained(directory), load_file(os.path.join(directory, "model.safetensors"))


def test_canonical_megatron_name():
    assert canonical_megatron_name("module.module.language_model.decoder.layers.0.mlp.linear_fc1.weight") == \
        "decoder.layers.0.mlp.linear_fc1.weight"
    assert canonical_megatron_name("vision.vision_model.blocks.0.norm1.weight") == "vision_model.blocks.0.norm1.weight"
    assert canonical_megatron_name("output_layer.weight") == "output_layer.weight"


@pytest.mark.parametrize("arch,tie", ARCH_VARIANTS)
def test_single_process_export_equals_hf_state_dict(saved_model_dirs, arch, tie):
    """No torch.distributed: the QwenVLMegatronModel-style names (language_model., vision.) come back as HF."""
    config, hf = _load(saved_model_dirs(arch, tie))
    spec = get_mapping(arch)
    model = module_from_state_dict(hf_to_megatron_rank_state_dict(hf, config, 1, 0, spec=spec))
    exported = [pair for bucket in export_hf_weights(model, config, bucket_bytes=1 << 30) for pair in bucket]
    names = [name for name, _ in exported]
    assert len(names) == len(set(names)) and sorted(names) == sorted(hf)
    for name, tensor in exported:
        assert torch.equal(tensor, hf[name]), name
    # exported tensors never alias the live parameters
    param_ptrs = {p.data_ptr() for p in model.parameters()}
    assert not any(t.data_ptr() in param_ptrs for _, t in exported)


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


_LM_QKV = re.compile(r"\.self_attn\.[qkv]_proj\.")


@pytest.mark.parametrize("arch,tie", ARCH_VARIANTS)
def test_views_export_is_bit_identical_and_copies_only_the_qkv_relayout(saved_model_dirs, arch, tie):
    """views=True: the same names, dtypes and values, bit for bit, as the copying default; every tensor
    whose HF layout is a view of the Megatron one aliases its parameter (no copy), and only the
    language model's q / k / v (interleaved per group in Megatron's fused QKV) are fresh memory."""
    config, hf = _load(saved_model_dirs(arch, tie))
    model = module_from_state_dict(hf_to_megatron_rank_state_dict(hf, config, 1, 0, spec=get_mapping(arch)))
    params = list(model.parameters())
    viewed = [pair for bucket in export_hf_weights(model, config, bucket_bytes=1 << 16, views=True) for pair in bucket]
    assert sorted(name for name, _ in viewed) == sorted(hf)
    for name, tensor in viewed:
        assert tensor.dtype == hf[name].dtype and torch.equal(tensor, hf[name]), name
    copied = {name for name, tensor in viewed if not any(_shares_memory(tensor, p) for p in params)}
    assert copied == {name for name in hf if _LM_QKV.search(name)} and copied


def test_views_contract_engine_copies_before_the_next_optimizer_step(saved_model_dirs):
    """The contract behind sync_weights asking for views: it does ask (the exporter's default stays
    copies), the engine ends up with the exported values, and an in-place update of the trainer's
    parameters afterwards (an optimizer step) does not reach the engine until the next sync."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from care_megatron.rollout.colocate import sync_weights
    from care_megatron.rollout.hf_engine import HFRolloutEngine

    config, hf = _load(saved_model_dirs("qwen2_5_vl", False))
    trainer = module_from_state_dict(hf_to_megatron_rank_state_dict(hf, config, 1, 0, spec=get_mapping("qwen2_5_vl")))

    class MegatronLikeBackend:
        requested = []

        def export_weights(self, bucket_bytes, views=False):
            self.requested.append(views)
            return export_hf_weights(trainer, config, bucket_bytes, views=views)

    torch.manual_seed(3)
    rollout = Qwen2_5_VLForConditionalGeneration(config).eval()
    engine = HFRolloutEngine(rollout, tokenizer=None, stop_token_ids=[0], pad_token_id=0)
    backend = MegatronLikeBackend()
    sent = sync_weights(backend, engine, bucket_bytes=1 << 16)
    assert backend.requested == [True] and sent == sum(t.numel() * t.element_size() for t in hf.values())
    synced = {name: t.clone() for name, t in rollout.state_dict().items()}
    assert all(torch.equal(synced[name], hf_tensor) for name, hf_tensor in
               ((checkpoint_name_to_module_name(n, synced), t) for n, t in hf.items()))
    with torch.no_grad():  # the optimizer step that follows the sync
        for param in trainer.parameters():
            param.add_(1.0)
    for name, tensor in rollout.state_dict().items():
        assert torch.equal(tensor, synced[name]), name
    sync_weights(backend, engine, bucket_bytes=1 << 16)
    for name, tensor in hf.items():
        assert torch.equal(rollout.state_dict()[checkpoint_name_to_module_name(name, synced)], tensor + 1.0), name


def test_buckets_respect_size_and_peak_memory(saved_model_dirs):
    config, hf = _load(saved_model_dirs("qwen2_5_vl", False))
    model = module_from_state_dict(hf_to_megatron_state_dicts(hf, config)[(0, 0)])
    bucket_bytes = 200_000
    largest = max(t.numel() * t.element_size() for t in hf.values())
    assert largest <= bucket_bytes  # every tensor fits, so every bucket must respect the cap
    total = sum(t.numel() * t.element_size() for t in hf.values())

    live = {"bytes": 0, "peak": 0}

    def release(size):
        live["bytes"] -= size

    sizes, seen = [], {}
    for bucket in export_hf_weights(model, config, bucket_bytes=bucket_bytes):
        size = sum(t.numel() * t.element_size() for _, t in bucket)
        sizes.append(size)
        for name, tensor in bucket:
            nbytes = tensor.numel() * tensor.element_size()
            live["bytes"] += nbytes
            weakref.finalize(tensor, release, nbytes)
            seen[name] = tensor.sum().item()
        live["peak"] = max(live["peak"], live["bytes"])
        del bucket, tensor
    assert all(size <= bucket_bytes for size in sizes)
    assert sum(sizes) == total and len(sizes) >= total // bucket_bytes
    # buckets are handed over and released one at a time: never more than two alive
    assert live["peak"] <= 2 * bucket_bytes, live
    assert len(seen) == len(hf)


def test_bucket_dtype_cast_and_oversized_tensor(saved_model_dirs):
    config, hf = _load(saved_model_dirs("qwen3", False))
    model = module_from_state_dict(hf_to_megatron_state_dicts(hf, config)[(0, 0)])
    buckets = list(export_hf_weights(model, config, bucket_bytes=1024, dtype=torch.bfloat16))
    # every tensor is larger than 1 KiB except the norms: big ones travel alone
    for bucket in buckets:
        if len(bucket) > 1:
            assert sum(t.numel() * t.element_size() for _, t in bucket) <= 1024
    exported = dict(pair for bucket in buckets for pair in bucket)
    assert all(t.dtype == torch.bfloat16 for t in exported.values())
    assert all(torch.equal(exported[k], v.to(torch.bfloat16)) for k, v in hf.items())


def test_missing_parameter_is_a_clear_error(saved_model_dirs):
    config, hf = _load(saved_model_dirs("qwen2", False))
    state = hf_to_megatron_state_dicts(hf, config)[(0, 0)]
    del state["decoder.layers.2.mlp.linear_fc2.weight"]
    with pytest.raises(ValueError, match="no parameter decoder.layers.2.mlp.linear_fc2.weight"):
        list(export_hf_weights(module_from_state_dict(state), config))


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


@pytest.mark.distributed
def test_tp2_and_pp2_export_on_two_gloo_processes(saved_model_dirs, tmp_path):
    """TP=2 (all_gather) and PP=2 x VP=2 (broadcast from the owning stage) on 2 gloo ranks: every rank
    receives every HF tensor, identical to the transformers checkpoint."""
    source = saved_model_dirs("qwen2_5_vl", True)
    config, hf = _load(source)
    port, prefix = _free_port(), str(tmp_path / "export")
    procs = [subprocess.Popen([sys.executable, WORKER, str(rank), port, source, prefix],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
    for scenario, dtype in (("tp2", torch.float32), ("pp2vp2", torch.bfloat16), ("pp2vp2_views", torch.float32)):
        per_rank = []
        for rank in range(2):
            buckets = torch.load(f"{prefix}.{scenario}.rank{rank}.pt", weights_only=True)
            for bucket in buckets:
                if len(bucket) > 1:
                    assert sum(t.numel() * t.element_size() for _, t in bucket) <= 60_000
            per_rank.append(dict(pair for bucket in buckets for pair in bucket))
        for exported in per_rank:
            assert sorted(exported) == sorted(hf)  # tied: no lm_head, as on disk
            for name, tensor in hf.items():
                assert torch.equal(exported[name], tensor.to(dtype)), (scenario, name)
