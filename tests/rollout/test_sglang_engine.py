"""SGLangRolloutEngine with the SGLang API surface faked at the import boundary.

The fake ``sglang.Engine`` records calls and answers like SGLang's offline engine (dicts with
``output_ids`` / ``meta_info``); the fake serializer pickles what it is given and the fake engine
unpickles and rebuilds the bucket as SGLang would, so bucket serialisation is checked end to end
on CPU tensors. Everything in ``sglang_engine`` itself runs for real.
"""
from __future__ import annotations

import os
import queue
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from care_megatron.rollout import sglang_engine as se
from care_megatron.rollout.base import GenerationRequest, RolloutEngine, SamplingParams
from _rollout_helpers import make_image, make_request
from sglang_fakes import FakeEngine, FakeMetadata, fake_api


def make_engine(tokenizer=None, **cfg):
    config = se.SGLangEngineConfig(model_path="/runs/x/hf", **cfg)
    return se.SGLangRolloutEngine(config, tokenizer, api=fake_api())


def sglang_output(tokens, logprobs, finish="stop", text="", with_output_ids=True):
    out = {"text": text, "meta_info": {"finish_reason": {"type": finish},
                                       "output_token_logprobs": [(lp, t, None) for lp, t in zip(logprobs, tokens)]}}
    if with_output_ids:
        out["output_ids"] = list(tokens)
    return out


def test_missing_sglang_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sglang", None)  # makes `import sglang` raise ImportError
    with pytest.raises(ImportError, match=r"care_megatron\[sglang\]"):
        se.load_sglang_api()


@pytest.mark.parametrize("version,ok", [("0.5.3", True), ("0.5.23", True), ("0.5.3rc2", False), ("0.4.10", False),
                                        ("0.6.0", False), ("garbage!", False)])
def test_version_check(version, ok):
    if ok:
        se.check_sglang_version(version)
    else:
        with pytest.raises(RuntimeError, match="sglang>=0.5.3,<0.6"):
            se.check_sglang_version(version)
    if not ok:
        with pytest.raises(RuntimeError):
            se.SGLangRolloutEngine(se.SGLangEngineConfig(model_path="m"), api=fake_api(version))


def test_original_logprob_env_is_refused():
    se.check_logprob_convention({})
    with pytest.raises(RuntimeError, match="SGLANG_RETURN_ORIGINAL_LOGPROB"):
        se.check_logprob_convention({"SGLANG_RETURN_ORIGINAL_LOGPROB": "True"})


def test_engine_start_arguments(tokenizer):
    engine = make_engine(tokenizer, tp_size=2, base_gpu_id=4, mem_fraction_static=0.4,
                         engine_kwargs={"disable_cuda_graph": True})
    assert isinstance(engine, RolloutEngine)
    assert engine.engine.kwargs == dict(model_path="/runs/x/hf", tp_size=2, base_gpu_id=4, mem_fraction_static=0.4,
                                        enable_memory_saver=True, dtype="bfloat16", random_seed=0,
                                        disable_cuda_graph=True)
    assert engine.stop_token_ids == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    with pytest.raises(ValueError, match="mem_fraction_static"):
        se.SGLangEngineConfig(model_path="m", mem_fraction_static=1.0)


@pytest.mark.parametrize("local_rank,expected", [(0, (0, 0, 0, True)), (1, (0, 0, 1, False)), (2, (1, 2, 0, True)),
                                                 (7, (3, 6, 1, False))])
def test_placement_rule(local_rank, expected):
    p = se.rollout_placement(local_rank, local_world_size=8, rollout_tp=2)
    assert (p.engine_index, p.base_gpu_id, p.tp_rank, p.is_engine_owner) == expected
    assert p.group_local_ranks == (p.base_gpu_id, p.base_gpu_id + 1)
    with pytest.raises(ValueError, match="must divide"):
        se.rollout_placement(0, local_world_size=8, rollout_tp=3)


def test_request_building_splits_text_and_images(tokenizer, image_processor):
    engine = make_engine(tokenizer)
    img = make_image(0)
    reqs = [
        make_request(tokenizer, image_processor, "a", "how many shapes", [img]),
        make_request(tokenizer, image_processor, "b", "what is 2 + 3", prefix="<think> so"),
        make_request(tokenizer, image_processor, "c", "count", [img, make_image(1)], prefix="<think> 2"),
    ]
    sampling = SamplingParams(temperature=0.8, top_p=0.9, top_k=-1, max_new_tokens=32, stop_token_ids=[7])
    calls = engine.build_generate_calls(reqs, sampling)
    (text_idx, text_kw), (img_idx, img_kw) = calls
    assert text_idx == [1] and img_idx == [0, 2]
    assert text_kw["input_ids"] == [reqs[1].prompt_ids + reqs[1].prefix_ids]
    assert img_kw["prompt"] == [reqs[0].prompt_text, reqs[2].prompt_text + "<think> 2"]
    assert img_kw["image_data"] == [[img], reqs[2].images]
    for kw in (text_kw, img_kw):
        assert kw["return_logprob"] is True and kw["logprob_start_len"] == -1
        assert kw["sampling_params"] == {"temperature": 0.8, "top_p": 0.9, "top_k": -1, "max_new_tokens": 32,
                                         "stop_token_ids": sorted({7, tokenizer.convert_tokens_to_ids("<|im_end|>")}),
                                         "skip_special_tokens": False}
    bad = GenerationRequest(request_id="x", prompt_ids=[1], images=[img])
    with pytest.raises(ValueError, match="no prompt_text"):
        engine.build_generate_calls([bad], sampling)


def test_per_request_sampling_seed_is_opt_in(tokenizer, image_processor):
    reqs = [make_request(tokenizer, image_processor, str(i), "count", [make_image(0)] if i % 2 else None) for i in range(4)]
    seeded = SamplingParams(seed=100)
    plain = make_engine(tokenizer).build_generate_calls(reqs, seeded)
    assert all("sampling_seed" not in kw["sampling_params"] for _, kw in plain)
    calls = make_engine(tokenizer, forward_sampling_seed=True).build_generate_calls(reqs, seeded)
    seeds = {i: p["sampling_seed"] for idx, kw in calls for i, p in zip(idx, kw["sampling_params"])}
    assert seeds == {0: 100, 1: 101, 2: 102, 3: 103}  # distinct per request, stable per position


def test_generate_extracts_logprobs_in_request_order(tokenizer, image_processor):
    engine = make_engine(tokenizer)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    think = tokenizer.convert_tokens_to_ids("<think>")
    reqs = [make_request(tokenizer, image_processor, "img", "count", [make_image(0)]),
            make_request(tokenizer, image_processor, "txt", "what is 2 + 3")]
    # The text-only call comes first, then the image call.
    engine.engine.script = [
        [sglang_output([think, 33, im_end], [-0.1, -0.2, -0.3])],
        [sglang_output([34, 35], [-1.0, -2.0], finish="length", with_output_ids=False)],
    ]
    out = engine.generate(reqs, SamplingParams(max_new_tokens=2))
    assert [c.request_id for c in out] == ["img", "txt"]
    assert out[0].token_ids == [34, 35] and out[0].logprobs == [-1.0, -2.0] and out[0].finish_reason == "length"
    assert out[1].token_ids == [think, 33, im_end] and out[1].logprobs == pytest.approx([-0.1, -0.2, -0.3])
    assert out[1].finish_reason == "stop" and out[1].text == tokenizer.decode([think, 33], skip_special_tokens=False)


def test_sampled_vision_placeholder_cuts_the_response(tokenizer, image_processor):
    engine = make_engine(tokenizer)
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    engine.engine.script = [[sglang_output([30, 31, pad, 32], [-0.1, -0.2, -0.3, -0.4], finish="stop")]]
    comp = engine.generate([make_request(tokenizer, image_processor, "t", "count")], SamplingParams())[0]
    assert comp.token_ids == [30, 31] and comp.logprobs == [-0.1, -0.2] and comp.finish_reason == "length"
    assert engine.placeholder_truncations == 1
    assert engine.placeholder_token_ids == {tokenizer.convert_tokens_to_ids(t) for t in se.VISION_PLACEHOLDERS}


def test_logprob_extraction_edge_cases():
    stop = {9}
    trimmed = {"output_ids": [4], "meta_info": {"finish_reason": {"type": "stop", "matched": 9},
                                                 "output_token_logprobs": [(-0.5, 4, None), (-0.25, 9, None)]}}
    comp = se.completion_from_sglang_output("r", trimmed, stop)
    assert comp.token_ids == [4, 9] and comp.logprobs == [-0.5, -0.25]
    aborted = {"meta_info": {"finish_reason": {"type": "abort", "message": "too long"}, "output_token_logprobs": []}}
    assert se.completion_from_sglang_output("r", aborted, stop).finish_reason == "length"
    with pytest.raises(ValueError, match="return_logprob"):
        se.completion_from_sglang_output("r", {"meta_info": {}}, stop)
    with pytest.raises(ValueError, match="disagree"):
        se.completion_from_sglang_output("r", {"output_ids": [1, 2], "meta_info": {
            "finish_reason": {"type": "length"}, "output_token_logprobs": [(-1.0, 3, None)]}}, stop)


def test_bucketing_respects_size_and_dtype():
    tensors = [("a", torch.zeros(10)), ("b", torch.zeros(10)), ("c", torch.zeros(30)), ("d", torch.zeros(5, dtype=torch.bfloat16)),
               ("e", torch.zeros(100)), ("f", torch.zeros(1))]
    buckets = list(se.bucket_named_tensors(iter(tensors), bucket_bytes=80))
    assert [[n for n, _ in b] for b in buckets] == [["a", "b"], ["c"], ["d"], ["e"], ["f"]]
    for b in buckets:
        assert len({t.dtype for _, t in b}) == 1
        assert sum(t.numel() * t.element_size() for _, t in b) <= 80 or len(b) == 1


def test_flatten_round_trip_exact():
    torch.manual_seed(0)
    bucket = [("w", torch.randn(3, 4)), ("b", torch.randn(4)), ("s", torch.randn(()))]
    flat, meta = se.flatten_bucket(bucket, FakeMetadata)
    assert flat.shape == (17,) and [m.start_idx for m in meta] == [0, 12, 16]
    for (n0, t0), (n1, t1) in zip(bucket, se.unflatten_bucket(flat, meta)):
        assert n0 == n1 and torch.equal(t0, t1)
    with pytest.raises(ValueError, match="bucket is torch.float32"):
        se.flatten_bucket([("a", torch.zeros(2)), ("b", torch.zeros(2, dtype=torch.float16))], FakeMetadata)


def test_colocated_update_sends_every_tensor_per_rank_then_flushes(tokenizer):
    engine = make_engine(tokenizer, tp_size=2, weight_bucket_mb=1)
    torch.manual_seed(0)
    state = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(256, 512) for i in range(5)}  # 512 KiB each
    state["lm_head.weight"] = torch.randn(8, 8).bfloat16()
    engine.update_weights(iter(state.items()))
    calls = engine.engine.calls
    updates = [kw for name, kw in calls if name == "update_weights_from_tensor"]
    assert len(updates) == 4  # 2 + 2 + 1 fp32 tensors under 1 MiB, then the bf16 one
    assert all(kw == dict(n=2, load_format="flattened_bucket", flush_cache=False) for kw in updates)
    assert calls[-1][0] == "flush_cache" and sum(name == "flush_cache" for name, _ in calls) == 1
    assert engine.engine.weights.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(engine.engine.weights[name], tensor)


def test_disaggregated_update_broadcasts_in_announced_order(tokenizer):
    engine = make_engine(tokenizer, colocated=False, weight_group_name="g")
    engine.init_weight_sync_group("10.0.0.1", 29600, rank_offset=1, world_size=3)
    assert engine.engine.calls[0] == ("init_weights_update_group", dict(
        master_address="10.0.0.1", master_port=29600, rank_offset=1, world_size=3, group_name="g", backend="nccl"))
    engine.engine.channel = queue.Queue()
    buckets = [[("x", torch.ones(2, 3)), ("y", torch.zeros(4, dtype=torch.bfloat16))], [("z", torch.full((1,), 5.0))]]
    engine.update_weights_distributed(iter(buckets), broadcast=lambda t: engine.engine.channel.put(t.clone()))
    announced = [kw for name, kw in engine.engine.calls if name == "update_weights_from_distributed"]
    assert [kw["names"] for kw in announced] == [["x", "y"], ["z"]]
    assert announced[0]["dtypes"] == ["float32", "bfloat16"] and announced[0]["shapes"] == [[2, 3], [4]]
    assert torch.equal(engine.engine.weights["z"], torch.full((1,), 5.0))
    assert engine.engine.calls[-1][0] == "flush_cache"
    with pytest.raises(RuntimeError, match="colocated path"):
        engine.update_weights([("x", torch.ones(1))])


def test_failed_update_raises(tokenizer):
    engine = make_engine(tokenizer)
    engine.engine.update_weights_from_tensor = lambda **kw: (False, "shape mismatch for lm_head.weight")
    with pytest.raises(RuntimeError, match="shape mismatch for lm_head.weight"):
        engine.update_weights([("lm_head.weight", torch.zeros(2))])


def test_sleep_wake_shutdown_calls(tokenizer, image_processor):
    engine = make_engine(tokenizer)
    engine.sleep()
    engine.sleep()  # idempotent
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate([make_request(tokenizer, image_processor, "a", "count")], SamplingParams())
    engine.wake(["weights"])
    assert engine.asleep
    engine.wake(["kv_cache"])
    assert not engine.asleep
    engine.shutdown()
    names = [(n, kw.get("tags")) for n, kw in engine.engine.calls]
    assert names == [("release_memory_occupation", None), ("resume_memory_occupation", ["weights"]),
                     ("resume_memory_occupation", ["kv_cache"]), ("shutdown", None)]


def test_registry_lazy_and_unknown_names():
    from care_megatron.rollout.registry import get_rollout_engine, get_rollout_engine_class

    assert get_rollout_engine_class("sglang") is se.SGLangRolloutEngine
    with pytest.raises(ValueError, match="valid: hf, sglang"):
        get_rollout_engine("vllm")
    engine = get_rollout_engine("sglang", se.SGLangEngineConfig(model_path="m"), api=fake_api())
    assert isinstance(engine, se.SGLangRolloutEngine)


@pytest.mark.distributed
def test_colocated_group_update_gathers_each_ranks_payload(tmp_path):
    import json
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    worker = Path(__file__).with_name("colocated_group_worker.py")
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "result.json"
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(worker), str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    logs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    result = json.loads(out.read_text())
    assert result["sent"] == 3  # two fp32 q_proj per 32 KiB bucket, one more, then the bf16 lm_head
    assert result["origins"] == [[0, 1]] * 3  # SGLang rank i got rank i's own copy
    assert result["calls"].count("update_weights_from_tensor") == 3 and result["calls"][-1] == "flush_cache"
    assert result["exact"] and len(result["names"]) == 4
