"""The SGLang adapter against what the 0.5.23 release does and the adapter once assumed it did not
(issue 22): weight-update sessions, the start-up environment, the vision-embedding cache, float32
models, the trainer's memory at start-up, the context length, per-rank payloads, RGR prefixes that
re-tokenise differently, the torch backend's export device, and SGLang's weight-name rules.

Each behaviour is the fake's (``sglang_fakes``), keyed on the wheel-extracted table; every test
here fails with the adapter as it was before the issue.
"""
from __future__ import annotations

import os

import pytest
import torch

from care_megatron.rollout import sglang_engine as se
from care_megatron.rollout.base import SamplingParams
from _rollout_helpers import make_image, make_request
from sglang_fakes import FAKED_VERSIONS, SIGNATURES, fake_api, missing_parameters


def make_engine(tokenizer=None, version=FAKED_VERSIONS[-1], **cfg):
    config = se.SGLangEngineConfig(**{"model_path": "/runs/x/hf", "context_length": 512, **cfg})
    return se.SGLangRolloutEngine(config, tokenizer, api=fake_api(version))


def output(tokens, finish="stop"):
    return {"output_ids": list(tokens), "meta_info": {"finish_reason": {"type": finish},
                                                      "output_token_logprobs": [(-0.5, t, None) for t in tokens]}}


# --------------------------------------------------------------------------- 1. weight-update sessions
@pytest.mark.parametrize("version", FAKED_VERSIONS)
def test_sync_runs_inside_a_weight_update_session_where_sglang_has_one(version):
    engine = make_engine(version=version, tp_size=2, weight_bucket_mb=1)
    state = {f"model.layers.{i}.mlp.up_proj.weight": torch.full((256, 512), float(i)) for i in range(3)}
    engine.update_weights(iter(state.items()))
    names = [n for n, _ in engine.engine.calls]
    if SIGNATURES[version]["weight_update_session_required"]:
        assert names == ["begin_weight_update"] + ["update_weights_from_tensor"] * 2 + ["end_weight_update", "flush_cache"]
    else:
        assert names == ["update_weights_from_tensor"] * 2 + ["flush_cache"]
    assert all(torch.equal(engine.engine.weights[n], t) for n, t in state.items())


def test_failed_bucket_still_closes_the_session():
    engine = make_engine()
    real = engine.engine.update_weights_from_tensor
    engine.engine.update_weights_from_tensor = lambda **kw: (False, "shape mismatch")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        engine.update_weights([("lm_head.weight", torch.zeros(2))])
    assert not engine.engine.session_open
    engine.engine.update_weights_from_tensor = real
    engine.update_weights([("lm_head.weight", torch.ones(2))])  # the next sync opens its own session
    assert torch.equal(engine.engine.weights["lm_head.weight"], torch.ones(2))


# --------------------------------------------------------------------------- 2, 9c. start-up environment
def test_engine_starts_without_the_agent_store_and_leaves_this_process_environment_as_it_was(monkeypatch):
    monkeypatch.setenv(se.AGENT_STORE_ENV, "True")  # what torchrun sets in every worker
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # what Megatron asks for
    for name in ("NCCL_CUMEM_ENABLE", "NCCL_NVLS_ENABLE", se.VLM_CACHE_ENV):
        monkeypatch.delenv(name, raising=False)
    before = dict(os.environ)
    engine = make_engine()  # the fake times out like SGLang's scheduler with the agent store set
    assert dict(os.environ) == before  # every rank's later NCCL communicators see the same values
    assert engine.engine.vision_cache_mb == 0


# --------------------------------------------------------------------------- 3. vision-embedding cache
def test_repeated_image_is_embedded_by_the_current_vision_weights(tokenizer, image_processor):
    engine = make_engine(tokenizer, image_min_pixels=None, image_max_pixels=None)
    request = [make_request(tokenizer, image_processor, "a", "count", [make_image(0)])]
    engine.engine.script = [[output([30])], [output([31])]]
    engine.generate(request, SamplingParams())
    engine.update_weights([("visual.patch_embed.proj.weight", torch.ones(2))])  # a training step moved the tower
    engine.generate(request, SamplingParams())  # the same image: held-out evaluation, a later epoch
    assert engine.engine.stale_vision_embeddings == 0


# --------------------------------------------------------------------------- 5. float32
def test_float32_model_on_sglang_is_refused_at_config_time():
    from care_megatron.config.loader import load_config

    with pytest.raises(ValueError, match="config field 'model.dtype'.*rollout.engine=sglang"):
        load_config(None, ["rollout.engine=sglang"])  # model.dtype defaults to float32
    assert load_config(None, ["rollout.engine=sglang", "model.dtype=bfloat16"]).model.dtype == "bfloat16"
    assert load_config(None, []).model.dtype == "float32"  # the CPU default with the HF engine stays valid


def test_check_tool_starts_sglang_in_bfloat16():
    import ast
    from pathlib import Path

    tool = Path(__file__).resolve().parents[2] / "tools" / "sglang_check.py"
    dtypes = {kw.value.value for node in ast.walk(ast.parse(tool.read_text())) if isinstance(node, ast.Call)
              for kw in node.keywords if kw.arg == "dtype" and isinstance(kw.value, ast.Constant)}
    assert dtypes == {"bfloat16"}


# --------------------------------------------------------------------------- 6. trainer asleep at start-up
def test_sglang_engine_starts_while_the_trainer_sleeps(tmp_path, monkeypatch):
    import care_megatron.training.registry as backends
    from care_megatron.config.loader import load_config
    from care_megatron.rollout import builder
    from care_megatron.trainer import RLTrainer

    config = load_config(None, ["rollout.engine=sglang", "model.dtype=bfloat16", f"train.output_dir={tmp_path}",
                                "data.train_size=8", "data.eval_size=0", "data.prompts_per_step=2"])
    events = []

    class Backend:
        def sleep(self):
            events.append("trainer sleeps")

        def wake(self):
            events.append("trainer wakes")

    class Engine:
        stop_token_ids = [1]

    def start_engine(config, model, tokenizer):
        events.append("engine sizes its KV pool")
        return Engine()

    monkeypatch.setattr(backends, "build_backend", lambda config, model: Backend())
    monkeypatch.setattr(builder, "build_rollout_engine", start_engine)
    RLTrainer(config, progress=False)
    assert events == ["trainer sleeps", "engine sizes its KV pool"]  # and it stays asleep for the first step


def test_builder_gives_the_engine_the_policy_context_length(model, tokenizer, tmp_path, monkeypatch):
    from care_megatron.config.schema import RunConfig
    from care_megatron.rollout import builder

    config = RunConfig()
    config.rollout.engine, config.model.dtype, config.train.output_dir = "sglang", "bfloat16", str(tmp_path)
    monkeypatch.setattr(se, "load_sglang_api", fake_api)
    engine = builder.build_rollout_engine(config, model, tokenizer)
    assert engine.context_length == model.config.get_text_config().max_position_embeddings
    assert engine.engine.kwargs["context_length"] == engine.context_length


# --------------------------------------------------------------------------- 7. context length
def test_prompts_too_long_for_the_context_do_not_fail_the_batch(tokenizer, image_processor):
    engine = make_engine(tokenizer, context_length=40)
    short = make_request(tokenizer, image_processor, "short", "count")
    long_words = " ".join(["count"] * 30)
    near = make_request(tokenizer, image_processor, "near", long_words)  # fits, but not with 16 new tokens
    over = make_request(tokenizer, image_processor, "over", long_words + " " + long_words)
    assert len(near.prompt_ids) < 40 - 1 < len(near.prompt_ids) + 16 and len(over.prompt_ids) >= 40
    engine.engine.script = [[output([30]), output([31], finish="length")]]
    out = engine.generate([short, near, over], SamplingParams(max_new_tokens=16))
    sent = engine.engine.calls[-1][1]
    assert [p["max_new_tokens"] for p in sent["sampling_params"]] == [16, 40 - 1 - len(near.prompt_ids)]
    assert [c.token_ids for c in out] == [[30], [31], []]
    assert [c.finish_reason for c in out] == ["stop", "length", "length"] and engine.unsent_requests == 1


# --------------------------------------------------------------------------- 8. export device
def test_torch_backend_exports_from_its_device_while_asleep(model):
    from care_megatron.training.torch_backend import TorchBackend

    backend = TorchBackend(model, lr=1e-3, keep_reference=False)
    awake = [(n, t.clone()) for bucket in backend.export_weights(1 << 20) for n, t in bucket]
    # asleep: the weights live in host memory while the training device is elsewhere ("meta" stands
    # in for the GPU here: it takes the copies without holding data)
    backend.device = torch.device("meta")
    asleep = [(n, t) for bucket in backend.export_weights(1 << 20) for n, t in bucket]
    assert [n for n, _ in asleep] == [n for n, _ in awake]
    assert all(t.device.type == "meta" and t.shape == a.shape for (_, t), (_, a) in zip(asleep, awake))


# --------------------------------------------------------------------------- 9a. one payload per rank
def test_each_tp_rank_deserialises_its_own_payload():
    engine = make_engine(tp_size=4)
    engine.update_weights([("lm_head.weight", torch.arange(6.0))])  # the fake refuses a payload read twice
    assert len(engine.engine.received_by_rank) == 4
    assert all(torch.equal(b["flattened_tensor"], torch.arange(6.0)) for b in engine.engine.received_by_rank)


# --------------------------------------------------------------------------- 9b. RGR prefix of image requests
def test_image_request_prefix_that_would_retokenise_differently_is_not_sent(tokenizer, image_processor):
    engine = make_engine(tokenizer)
    image = make_image(0)
    good = make_request(tokenizer, image_processor, "good", "count", [image], prefix="<think> so")
    glued = make_request(tokenizer, image_processor, "glued", "count", [image], prefix="so")
    glued.prompt_text = glued.prompt_text.rstrip()  # "... assistant" + "so" is one unknown word to SGLang
    calls = engine.build_generate_calls([good, glued], SamplingParams())
    assert [indices for indices, _ in calls] == [[0]]
    assert calls[0][1]["prompt"] == [good.prompt_text + "<think> so"]


# --------------------------------------------------------------------------- the fake's weight-name rules
@pytest.mark.parametrize("name", ["tiny_qwen2_5_vl", "tiny_qwen3_vl"])
def test_every_exported_name_reaches_an_sglang_parameter(name, tmp_path):
    from care_megatron.config.schema import ModelConfig
    from care_megatron.models import build_model_and_processor
    from care_megatron.sft import save_policy
    from care_megatron.training.torch_backend import TorchBackend

    arch = name.removeprefix("tiny_")
    policy, tok, _ = build_model_and_processor(ModelConfig(name=name, arch=arch))
    save_policy(policy, tok, tmp_path)  # config.json: the fake builds SGLang's parameter table from it
    engine = make_engine(model_path=str(tmp_path), context_length=None)
    backend = TorchBackend(policy, lr=1e-3, keep_reference=False)
    engine.update_weights_from_buckets(backend.export_weights(1 << 20))
    assert engine.engine.skipped_weights == []
    assert missing_parameters(engine.engine) == set()
    # the names the rules refuse: transformers-5 module names are skipped (or fail) for Qwen2.5-VL
    if arch == "qwen2_5_vl":
        engine.update_weights([("model.language_model.norm.weight", torch.ones(32))])
        assert engine.engine.skipped_weights == ["model.language_model.norm.weight"]
        with pytest.raises(KeyError):
            engine.update_weights([("model.language_model.layers.0.self_attn.q_proj.weight", torch.ones(32, 32))])
