"""SGLangRolloutEngine with the SGLang API surface faked at the import boundary.

The fake ``sglang.Engine`` (``sglang_fakes``) records calls and answers like SGLang's offline engine
of the faked version: dicts with ``output_ids`` / ``meta_info``, SGLang's image-token arithmetic,
its memory tags, and garbage weights after a release that no weight update followed. Everything
in ``sglang_engine`` itself runs for real.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from care_megatron.rollout import sglang_engine as se
from care_megatron.rollout.base import GenerationRequest, RolloutEngine, SamplingParams
from _rollout_helpers import make_image, make_request
from sglang_fakes import FAKED_VERSIONS, FakeMetadata, fake_api


def make_engine(tokenizer=None, version=FAKED_VERSIONS[-1], **cfg):
    config = se.SGLangEngineConfig(**{"model_path": "/runs/x/hf", "context_length": 512, **cfg})
    return se.SGLangRolloutEngine(config, tokenizer, api=fake_api(version))


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
            se.SGLangRolloutEngine(se.SGLangEngineConfig(model_path="m", context_length=512), api=fake_api(version))


def test_original_logprob_env_is_refused():
    se.check_logprob_convention({})
    se.check_logprob_convention({"SGLANG_RETURN_ORIGINAL_LOGPROB": "0", "RETURN_ORIGINAL_LOGPROB": "false"})
    with pytest.raises(RuntimeError, match="SGLANG_RETURN_ORIGINAL_LOGPROB"):
        se.check_logprob_convention({"SGLANG_RETURN_ORIGINAL_LOGPROB": "True"})
    # the name early 0.5.x reads (0.5.3 layers/sampler.py)
    with pytest.raises(RuntimeError, match="^RETURN_ORIGINAL_LOGPROB is set"):
        se.check_logprob_convention({"RETURN_ORIGINAL_LOGPROB": "1"})


def test_engine_start_arguments(tokenizer):
    engine = make_engine(tokenizer, tp_size=2, base_gpu_id=4, mem_fraction_static=0.4, nccl_port=21007,
                         engine_kwargs={"disable_cuda_graph": True})
    assert isinstance(engine, RolloutEngine)
    assert engine.engine.kwargs == dict(model_path="/runs/x/hf", tp_size=2, base_gpu_id=4, mem_fraction_static=0.4,
                                        enable_memory_saver=True, dtype="bfloat16", random_seed=0, nccl_port=21007,
                                        context_length=512, disable_cuda_graph=True)
    assert "nccl_port" not in se.SGLangEngineConfig(model_path="m").engine_args()  # SGLang's own choice
    with pytest.raises(TypeError, match="no_such_server_arg"):  # the fake takes only real ServerArgs fields
        make_engine(tokenizer, engine_kwargs={"no_such_server_arg": 1})
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
    # images travel at the trainer's size (grid x patch 14); these 56 px ones already are, so unchanged
    assert [im.size for im in img_kw["image_data"][1]] == [(56, 56), (56, 56)]
    assert img_kw["image_data"][0][0] is img
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
    # a transposed (non-contiguous) view, as the exporter hands out, keeps its logical order
    bucket = [("w", torch.randn(3, 4)), ("b", torch.randn(4)), ("s", torch.randn(())), ("t", torch.randn(4, 2).t())]
    flat, meta = se.flatten_bucket(bucket, FakeMetadata)
    assert flat.shape == (25,) and [m.start_idx for m in meta] == [0, 12, 16, 17]
    assert torch.equal(flat[17:], bucket[3][1].reshape(-1))
    buffer = torch.full((30,), float("nan"))
    reused, _ = se.flatten_bucket(bucket, FakeMetadata, out=buffer)
    assert reused.data_ptr() == buffer.data_ptr() and torch.equal(reused, flat)
    with pytest.raises(ValueError, match="the bucket needs"):
        se.flatten_bucket(bucket, FakeMetadata, out=torch.empty(24))
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


def test_failed_update_raises(tokenizer):
    engine = make_engine(tokenizer)
    engine.engine.update_weights_from_tensor = lambda **kw: (False, "shape mismatch for lm_head.weight")
    with pytest.raises(RuntimeError, match="shape mismatch for lm_head.weight"):
        engine.update_weights([("lm_head.weight", torch.zeros(2))])


@pytest.mark.parametrize("version", FAKED_VERSIONS)
def test_tagged_sleep_wake_follow_sglang_tags(tokenizer, image_processor, version):
    engine = make_engine(tokenizer, version=version)
    kv = ["kv_cache", "cuda_graph"] if version != "0.5.3" else ["kv_cache"]  # 0.5.3 has no cuda_graph tag
    engine.sleep()
    engine.sleep()  # idempotent
    with pytest.raises(RuntimeError, match="released"):
        engine.generate([make_request(tokenizer, image_processor, "a", "count")], SamplingParams())
    engine.wake(("weights",))
    assert engine.asleep and engine.released == {"kv_cache"}
    engine.wake(("weights",))  # already resumed: nothing sent (SGLang would raise KeyError)
    engine.update_weights([("lm_head.weight", torch.ones(2, 2))])
    engine.wake(("kv_cache",))
    assert not engine.asleep
    engine.sleep(("kv_cache",))
    engine.wake()
    with pytest.raises(ValueError, match="unknown memory tag"):
        engine.sleep(("cuda_graph",))  # not a protocol tag: it goes with the KV cache
    engine.shutdown()
    memory = [(n, kw.get("tags")) for n, kw in engine.engine.calls if "memory" in n]
    assert memory == [("release_memory_occupation", ["weights"] + kv), ("resume_memory_occupation", ["weights"]),
                      ("resume_memory_occupation", kv), ("release_memory_occupation", kv),
                      ("resume_memory_occupation", kv)]
    assert engine.engine.offload_tags == set() and engine.engine.calls[-1][0] == "shutdown"


@pytest.mark.parametrize("version", FAKED_VERSIONS)
def test_released_weights_must_be_sent_again_before_generating(tokenizer, image_processor, version):
    request = [make_request(tokenizer, image_processor, "a", "count")]
    engine = make_engine(tokenizer, version=version)
    engine.update_weights([("lm_head.weight", torch.ones(2, 2))])
    engine.sleep()
    assert torch.isnan(engine.engine.weights["lm_head.weight"]).all()  # the fake frees without a copy
    engine.wake()
    with pytest.raises(RuntimeError, match="weights were released"):
        engine.generate(request, SamplingParams())
    # the fake itself refuses too, so a caller that skipped the adapter's check would still fail
    with pytest.raises(RuntimeError, match="released weights never sent again"):
        engine.engine.generate(input_ids=[[1]], sampling_params={}, return_logprob=True)
    with pytest.raises(RuntimeError, match="weights are released"):
        engine.sleep(("weights",))
        engine.update_weights([("lm_head.weight", torch.ones(2, 2))])
    engine.wake(("weights",))
    engine.update_weights([("lm_head.weight", torch.full((2, 2), 3.0))])
    assert torch.equal(engine.engine.weights["lm_head.weight"], torch.full((2, 2), 3.0))
    engine.engine.script = [[sglang_output([30], [-0.5])]]
    assert engine.generate(request, SamplingParams())[0].token_ids == [30]


def test_registry_lazy_and_unknown_names():
    from care_megatron.rollout.registry import get_rollout_engine, get_rollout_engine_class

    assert get_rollout_engine_class("sglang") is se.SGLangRolloutEngine
    with pytest.raises(ValueError, match="valid: hf, sglang"):
        get_rollout_engine("vllm")
    engine = get_rollout_engine("sglang", se.SGLangEngineConfig(model_path="m", context_length=512), api=fake_api())
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


# --------------------------------------------------------------------------- NCCL ports (issue 12.6)
def test_engines_of_one_node_get_distinct_nccl_ports_whatever_the_seed():
    from care_megatron.config.schema import RunConfig
    from care_megatron.rollout.builder import sglang_engine_config

    config = RunConfig()
    ports = []
    for local_rank in (0, 2, 4, 6):  # four TP-2 engines of an 8-GPU node, each started by its own rank
        random.seed(config.train.seed)  # every rank seeds identically (seed_everything)
        placement = se.rollout_placement(local_rank, local_world_size=8, rollout_tp=2)
        engine_config = sglang_engine_config(config, placement, "/runs/x/hf", model=None)
        ports.append(engine_config.engine_args()["nccl_port"])
    assert len(set(ports)) == 4
    ranges = [range(se.NCCL_PORT_BASE + i * se.NCCL_PORT_SPAN, se.NCCL_PORT_BASE + (i + 1) * se.NCCL_PORT_SPAN)
              for i in range(4)]
    assert all(port in r for port, r in zip(ports, ranges))  # disjoint ranges: no race between the ranks


def test_nccl_port_skips_ports_in_use():
    import socket

    with socket.socket() as busy:
        busy.bind(("", 0))
        taken = busy.getsockname()[1]
        assert not se.port_is_free(taken)
        assert se.pick_nccl_port(0, base=taken, span=5) != taken  # the next free one of the slot
    assert se.pick_nccl_port(3, is_free=lambda port: port % 2 == 1) == se.NCCL_PORT_BASE + 3 * se.NCCL_PORT_SPAN + 1
    with pytest.raises(RuntimeError, match="no free port"):
        se.pick_nccl_port(1, is_free=lambda port: False)


# --------------------------------------------------------------------------- images (issue 12.7, 22.4)
TRAINER_PIXELS = dict(min_pixels=64 * 64, max_pixels=128 * 128)
"""The trainer's data.min_pixels / data.max_pixels in the image tests: below a real Qwen3-VL
directory's minimum (65,536 pixels), inside a real Qwen2.5-VL directory's bounds."""


def model_directory(path: Path, arch: str) -> str:
    """A model directory holding the released ``preprocessor_config.json`` of ``arch`` (Qwen2.5-VL:
    patch 14, 3,136..12,845,056 pixels; Qwen3-VL: patch 16, 65,536..16,777,216 pixels), which is
    what SGLang loads its processor from."""
    from care_megatron.data.prompting import build_image_processor

    build_image_processor(arch).save_pretrained(path)
    return str(path)


def image_requests(tokenizer, arch):
    from PIL import Image

    from care_megatron.data.prompting import build_image_processor

    trainer_processor = build_image_processor(arch, **TRAINER_PIXELS)
    images = [Image.new("RGB", (300, 170), "red"), Image.new("RGB", (90, 250), "blue"), make_image(3, size=56)]
    return [make_request(tokenizer, trainer_processor, f"r{i}", "count", [im]) for i, im in enumerate(images)]


@pytest.mark.parametrize("version", FAKED_VERSIONS)
@pytest.mark.parametrize("arch,patch", [("qwen2_5_vl", 14), ("qwen3_vl", 16)])
def test_engine_counts_the_trainers_image_tokens(tokenizer, tmp_path, version, arch, patch):
    """SGLang counts image tokens with the processor of the model directory (0.5.23, after 0.5.3's
    own resize); the engine sends trainer-sized images and, where SGLang takes them, the trainer's
    bounds, so the counts are the trainer's, or it refuses to start where they could not be."""
    requests = image_requests(tokenizer, arch)
    config = dict(model_path=model_directory(tmp_path, arch), image_patch_size=patch,
                  image_min_pixels=TRAINER_PIXELS["min_pixels"], image_max_pixels=TRAINER_PIXELS["max_pixels"])
    if version == "0.5.3" and arch == "qwen3_vl":  # 0.5.3 rounds every image to multiples of 28 first
        with pytest.raises(ValueError, match="'model.arch'.*multiples of 28.*multiples of 32"):
            make_engine(tokenizer, version=version, **config)
        return
    engine = make_engine(tokenizer, version=version, **config)
    engine.engine.script = [[sglang_output([30], [-0.1]) for _ in requests]]
    engine.generate(requests, SamplingParams())
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert engine.engine.image_token_counts == [[sum(t == pad for t in r.prompt_ids)] for r in requests]


def test_pixel_bounds_sglang_would_change_are_refused_at_start(tmp_path):
    from care_megatron.data.prompting import build_image_processor

    build_image_processor("qwen2_5_vl", min_pixels=96 * 96).save_pretrained(tmp_path)
    config = se.SGLangEngineConfig(model_path=str(tmp_path), context_length=512, **{
        f"image_{k}": v for k, v in TRAINER_PIXELS.items()})
    with pytest.raises(ValueError, match="'data.min_pixels' is 4096, below the minimum 9216 of the processor"):
        se.check_image_geometry(fake_api("0.5.3"), config)  # the directory's processor decides, and enlarges
    se.check_image_geometry(fake_api("0.5.23"), config)  # the trainer's bounds are passed through
    with pytest.raises(ValueError, match="'data.max_pixels'.* above the maximum 12845056 of SGLang 0.5.3"):
        se.check_image_geometry(fake_api("0.5.3"), se.SGLangEngineConfig(model_path="m", image_max_pixels=4 << 22))
    bad = GenerationRequest(request_id="x", prompt_ids=[1], prompt_text="t", images=[make_image(0)])
    with pytest.raises(ValueError, match="image_grid_thw"):
        make_engine().build_generate_calls([bad], SamplingParams())


# --------------------------------------------------------------------------- the trainer's wake order (12.5, 13.6)
WEIGHT_UPDATE_CALLS = ("begin_weight_update", "update_weights_from_tensor", "end_weight_update")


def assert_updates_in_sessions(calls, version):
    """On 0.5.23 every tensor update sits between begin_weight_update and end_weight_update, and the
    cache is flushed after the session closes; 0.5.3 has no sessions."""
    names = [n for n, _ in calls if n in WEIGHT_UPDATE_CALLS + ("flush_cache",)]
    if version == "0.5.3":
        assert "begin_weight_update" not in names
        return
    inside = False
    for name in names:
        if name == "begin_weight_update":
            assert not inside
        elif name == "end_weight_update":
            assert inside
        elif name == "update_weights_from_tensor":
            assert inside, names
        elif name == "flush_cache":
            assert not inside, names
        inside = {"begin_weight_update": True, "end_weight_update": False}.get(name, inside)
    assert not inside


class ExportingBackend:
    """The trainer side of a colocated step: exports fixed weights, records sleep / wake."""

    def __init__(self, weights):
        self.weights, self.calls = weights, []

    def export_weights(self, bucket_bytes):
        self.calls.append("export")
        return se.bucket_named_tensors(iter(self.weights.items()), bucket_bytes)

    def sleep(self):
        self.calls.append("sleep")

    def wake(self):
        self.calls.append("wake")


@pytest.mark.parametrize("version", FAKED_VERSIONS)
def test_trainer_rgr_round_trip_resends_the_weights_sglang_freed(tokenizer, image_processor, monkeypatch, version):
    import care_megatron.trainer as trainer_module
    from care_megatron.config.schema import RunConfig
    from care_megatron.rollout.colocate import StepSchedule

    weights = {"model.layers.0.mlp.up_proj.weight": torch.randn(4, 4), "lm_head.weight": torch.randn(8, 4)}
    trainer = trainer_module.RLTrainer.__new__(trainer_module.RLTrainer)
    trainer.config, trainer.backend = RunConfig(), ExportingBackend(weights)
    trainer.engine = make_engine(tokenizer, version=version)
    trainer.tokenizer, trainer.reward_fn = tokenizer, None
    request = [make_request(tokenizer, image_processor, "a", "count")]

    def reflect(engine, rollouts, targets, sampling, tokenizer, reward_fn, step, mode="repair"):
        return engine.generate(request, sampling)  # what reflect_hard_negatives asks of the engine

    monkeypatch.setattr(trainer_module, "reflect_hard_negatives", reflect)
    fake = trainer.engine.engine
    fake.script = [[sglang_output([30], [-0.1])], [sglang_output([31], [-0.2])]]
    s = StepSchedule(phases=trainer_module.RL_PHASES, timer=None)
    s.begin_step()
    trainer.engine.sleep()  # where the previous step left it
    trainer.rollout_phase(s, "")
    with s.phase("generate"):
        trainer.engine.generate(request, SamplingParams())
    trainer.trainer_phase(s, "")
    with s.phase("logprobs"):
        pass
    reflected = trainer.rgr_round_trip(s, [], [0], SamplingParams(), step=0)  # fails if the weights are not re-sent
    assert reflected[0].token_ids == [31]
    s.end_step()
    kv = ["kv_cache"] + (["cuda_graph"] if version != "0.5.3" else [])
    assert_updates_in_sessions(fake.calls, version)
    sequence = [(n, kw.get("tags")) for n, kw in fake.calls if n not in WEIGHT_UPDATE_CALLS]
    one_trip = [("resume_memory_occupation", ["weights"]), ("flush_cache", None), ("resume_memory_occupation", kv),
                ("generate", None), ("release_memory_occupation", ["weights"] + kv)]
    assert sequence == [("release_memory_occupation", ["weights"] + kv)] + one_trip + one_trip
    assert trainer.backend.calls == ["export", "wake", "sleep", "export", "wake"]
    for name, tensor in weights.items():
        assert torch.isnan(fake.weights[name]).all()  # freed again at the end of the round trip
    assert s.entered[:3] == ["wake_rollout", "update_weights", "wake_rollout_kv"]
    assert "update_weights_rgr" in s.entered and s.entered.index("update_weights_rgr") < s.entered.index("generate_rgr")


@pytest.mark.parametrize("version", ["0.5.3", "0.5.23"])
def test_trainer_evaluation_wakes_weights_syncs_then_wakes_the_kv_cache(tokenizer, monkeypatch, version):
    """Held-out evaluation re-sends the weights a slept SGLang engine freed, and allocates the KV
    cache only after the weight buckets are in (the step's colocated order, not a full wake)."""
    import care_megatron.trainer as trainer_module
    from care_megatron.config.schema import RunConfig

    weights = {"model.layers.0.mlp.up_proj.weight": torch.randn(4, 4), "lm_head.weight": torch.randn(8, 4)}
    trainer = trainer_module.RLTrainer.__new__(trainer_module.RLTrainer)
    trainer.config, trainer.backend = RunConfig(), ExportingBackend(weights)
    trainer.engine = make_engine(tokenizer, version=version)
    trainer.tokenizer, trainer.image_processor, trainer.reward_fn = tokenizer, None, None
    trainer.sampling, trainer.benchmark_subset, trainer.image_pipeline = {"stop_token_ids": []}, None, None
    trainer.system_prompt = None
    trainer.data = type("Data", (), {"eval": []})()

    class Report:
        def as_metrics(self):
            return {"eval/accuracy": 0.0}

    def evaluate(engine, *args, **kwargs):
        assert not any(torch.isnan(t).any() for t in engine.engine.weights.values())  # weights were re-sent
        return Report()

    monkeypatch.setattr(trainer_module, "evaluate", evaluate)
    fake = trainer.engine.engine
    trainer.engine.sleep()
    fake.calls.clear()
    assert trainer.evaluate() == {"eval/accuracy": 0.0}
    kv = ["kv_cache"] + (["cuda_graph"] if version != "0.5.3" else [])
    assert_updates_in_sessions(fake.calls, version)
    sequence = [(n, kw.get("tags")) for n, kw in fake.calls if n not in ("flush_cache", "begin_weight_update",
                                                                          "end_weight_update")]
    assert sequence[0] == ("resume_memory_occupation", ["weights"])
    assert [n for n, _ in sequence[1:-2]] == ["update_weights_from_tensor"] * (len(sequence) - 3)
    assert sequence[-2:] == [("resume_memory_occupation", kv), ("release_memory_occupation", ["weights"] + kv)]


def test_engine_model_dir_processor_keeps_trainer_sized_images(tmp_path):
    """The processor SGLang loads from the written model directory leaves the images the engine
    sends at their size: the same patch grid, so the same image tokens, as the trainer's."""
    from PIL import Image
    from transformers import Qwen2VLImageProcessorPil  # the fast (torchvision) class is not installed here

    from care_megatron.config.schema import RunConfig
    from care_megatron.data.prompting import build_image_processor
    from care_megatron.models import build_model_and_processor
    from care_megatron.rollout.builder import save_image_processor

    config = RunConfig()
    config.data.min_pixels, config.data.max_pixels = 56 * 56, 112 * 112
    model, _, trainer_processor = build_model_and_processor(config.model, min_pixels=config.data.min_pixels,
                                                            max_pixels=config.data.max_pixels)
    save_image_processor(config, model, str(tmp_path))
    assert (tmp_path / "preprocessor_config.json").is_file()
    loaded = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)
    patch = model.config.vision_config.patch_size
    for size in [(300, 170), (90, 250), (56, 56), (1000, 999)]:
        image = Image.new("RGB", size, "green")
        grid = trainer_processor(images=[image], return_tensors="pt")["image_grid_thw"]
        sent = se.trainer_sized_image(image, grid[0].tolist(), patch)
        assert torch.equal(loaded(images=[sent], return_tensors="pt")["image_grid_thw"], grid), size
        assert torch.equal(loaded(images=[image], return_tensors="pt")["image_grid_thw"], grid), size  # same bounds
    assert (loaded.size.shortest_edge, loaded.size.longest_edge) == (56 * 56, 112 * 112)
    reference = build_image_processor(config.model.arch, min_pixels=56 * 56, max_pixels=112 * 112)
    assert loaded.merge_size == reference.merge_size and loaded.patch_size == patch
