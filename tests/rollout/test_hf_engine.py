"""HFRolloutEngine against transformers generate and a teacher-forced forward pass (tiny Qwen2.5-VL)."""
from __future__ import annotations

import pytest
import torch

from care_megatron.rollout.base import GenerationRequest, RolloutEngine, SamplingParams
from care_megatron.rollout.hf_engine import HFRolloutEngine, multimodal_token_types
from _rollout_helpers import build_model, make_image, make_request


@pytest.fixture()
def requests_mixed(tokenizer, image_processor):
    return [
        make_request(tokenizer, image_processor, "img1", "how many shapes", [make_image(0)]),
        make_request(tokenizer, image_processor, "txt", "what is the tallest bar . so"),
        make_request(tokenizer, image_processor, "img2", "count", [make_image(1, 28), make_image(2)]),
        make_request(tokenizer, image_processor, "img3", "what is 2 + 3", [make_image(3, 28)]),
    ]


def direct_generate(model, request, max_new_tokens, eos_ids, pad_id):
    """model.generate itself, greedy, with the engine's default placeholder suppression."""
    ids = torch.tensor([request.prompt_ids + request.prefix_ids])
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    if request.pixel_values is not None:
        kwargs.update(pixel_values=request.pixel_values, image_grid_thw=request.image_grid_thw,
                      mm_token_type_ids=multimodal_token_types(ids, model.config))
    out = model.generate(**kwargs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_ids,
                         pad_token_id=pad_id, suppress_tokens=VISION_PLACEHOLDERS(model))
    return out[0, ids.shape[1]:].tolist()


def VISION_PLACEHOLDERS(model):
    c = model.config
    return [c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id]


def teacher_forced_logprobs(model, request, completion_ids, temperature, device=None):
    ids = torch.tensor([request.prompt_ids + request.prefix_ids + completion_ids], device=device)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    if request.pixel_values is not None:
        kwargs.update(pixel_values=request.pixel_values, image_grid_thw=request.image_grid_thw,
                      mm_token_type_ids=multimodal_token_types(ids, model.config))
    with torch.no_grad():
        logits = model(**kwargs).logits[0].float()
    start = len(request.prompt_ids) + len(request.prefix_ids)
    lp = torch.log_softmax(logits / temperature, dim=-1)
    positions = torch.arange(start - 1, ids.shape[1] - 1, device=device)
    return lp[positions, ids[0, start:]]


def test_engine_satisfies_protocol(model, tokenizer):
    assert isinstance(HFRolloutEngine(model, tokenizer), RolloutEngine)


def test_default_stop_ids_and_pad(model, tokenizer):
    engine = HFRolloutEngine(model, tokenizer)
    assert engine.stop_token_ids == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert engine.pad_token_id == tokenizer.pad_token_id


def test_greedy_matches_model_generate(model, tokenizer, requests_mixed):
    engine = HFRolloutEngine(model, tokenizer, batch_size=1)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=12)
    completions = engine.generate(requests_mixed, sampling)
    for req, comp in zip(requests_mixed, completions):
        expected = direct_generate(model, req, 12, engine.stop_token_ids, engine.pad_token_id)
        # generate pads finished rows; the engine cuts after the stop token.
        assert comp.token_ids == expected[: len(comp.token_ids)]
        assert all(t == engine.pad_token_id for t in expected[len(comp.token_ids):])
        assert comp.request_id == req.request_id
        assert len(comp.logprobs) == len(comp.token_ids)


def test_batched_equals_one_by_one_greedy(model, tokenizer, requests_mixed):
    sampling = SamplingParams(temperature=0.0, max_new_tokens=10)
    single = HFRolloutEngine(model, tokenizer, batch_size=1).generate(requests_mixed, sampling)
    batched = HFRolloutEngine(model, tokenizer, batch_size=4).generate(requests_mixed, sampling)
    assert [c.request_id for c in batched] == [r.request_id for r in requests_mixed]
    for a, b in zip(single, batched):
        assert a.token_ids == b.token_ids
        assert a.finish_reason == b.finish_reason
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_logprobs_equal_teacher_forced_forward(model, tokenizer, requests_mixed, temperature):
    engine = HFRolloutEngine(model, tokenizer, batch_size=4, stop_token_ids=[10_000])  # never stops: full length
    sampling = SamplingParams(temperature=temperature, top_k=8, top_p=0.9, max_new_tokens=8, seed=3)
    completions = engine.generate(requests_mixed, sampling)
    for req, comp in zip(requests_mixed, completions):
        assert comp.finish_reason == "length" and len(comp.token_ids) == 8
        expected = teacher_forced_logprobs(model, req, comp.token_ids, temperature if temperature > 0 else 1.0)
        torch.testing.assert_close(torch.tensor(comp.logprobs), expected, atol=1e-5, rtol=0)


def test_seeded_sampling_is_reproducible_and_leaves_global_rng(model, tokenizer, requests_mixed):
    engine = HFRolloutEngine(model, tokenizer, batch_size=2)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=10, seed=11)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = engine.generate(requests_mixed, sampling)
    assert torch.equal(torch.get_rng_state(), before)
    second = engine.generate(requests_mixed, sampling)
    assert [c.token_ids for c in first] == [c.token_ids for c in second]
    other = engine.generate(requests_mixed, SamplingParams(temperature=1.0, max_new_tokens=10, seed=12))
    assert [c.token_ids for c in other] != [c.token_ids for c in first]


def test_finish_reason_stop_and_length(model, tokenizer, requests_mixed):
    req = requests_mixed[0]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    free = HFRolloutEngine(model, tokenizer, stop_token_ids=[10_000]).generate([req], greedy)[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 6
    # Make the third greedy token a stop token: the response ends there, stop token included.
    stop_tok = free.token_ids[2]
    first_hit = free.token_ids.index(stop_tok)
    stopped = HFRolloutEngine(model, tokenizer, stop_token_ids=[10_000]).generate(
        [req], SamplingParams(temperature=0.0, max_new_tokens=6, stop_token_ids=[stop_tok]))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[: first_hit + 1]
    assert stopped.logprobs == pytest.approx(free.logprobs[: first_hit + 1], abs=1e-6)


def test_prefix_continuation_returns_only_new_tokens(model, tokenizer, image_processor):
    with_prefix = make_request(tokenizer, image_processor, "p", "count", [make_image(4)], prefix="<think> so 2 + 3")
    engine = HFRolloutEngine(model, tokenizer, stop_token_ids=[10_000])
    comp = engine.generate([with_prefix], SamplingParams(temperature=0.0, max_new_tokens=7))[0]
    assert comp.token_ids == direct_generate(model, with_prefix, 7, [10_000], engine.pad_token_id)
    expected = teacher_forced_logprobs(model, with_prefix, comp.token_ids, 1.0)
    torch.testing.assert_close(torch.tensor(comp.logprobs), expected, atol=1e-5, rtol=0)


def test_update_weights_reproduces_other_model(model, tokenizer, requests_mixed, tmp_path):
    other = build_model(tokenizer, seed=7)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=10)
    reference = HFRolloutEngine(other, tokenizer, batch_size=4).generate(requests_mixed, greedy)
    engine = HFRolloutEngine(model, tokenizer, batch_size=4)
    before = engine.generate(requests_mixed, greedy)
    assert [c.token_ids for c in before] != [c.token_ids for c in reference]
    # Checkpoint (on-disk / SGLang) names, as the Megatron exporter produces them.
    other.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    on_disk = load_file(str(tmp_path / "model.safetensors"))
    assert any(k.startswith("model.layers.") for k in on_disk) and any(k.startswith("visual.") for k in on_disk)
    engine.update_weights(iter(on_disk.items()))
    after = engine.generate(requests_mixed, greedy)
    assert [c.token_ids for c in after] == [c.token_ids for c in reference]
    for a, b in zip(after, reference):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-6)
    for name, tensor in other.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_update_weights_rejects_unknown_name_and_bad_shape(model, tokenizer):
    engine = HFRolloutEngine(model, tokenizer)
    with pytest.raises(ValueError, match="unknown weight 'model.layers.99.mlp.up_proj.weight'"):
        engine.update_weights([("model.layers.99.mlp.up_proj.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape mismatch for 'lm_head.weight'"):
        engine.update_weights([("lm_head.weight", torch.zeros(3, 3))])


def test_sleep_wake_cycle(model, tokenizer, requests_mixed):
    engine = HFRolloutEngine(model, tokenizer)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=4)
    first = engine.generate(requests_mixed[:1], greedy)
    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(requests_mixed[:1], greedy)
    engine.wake()
    assert engine.generate(requests_mixed[:1], greedy)[0].token_ids == first[0].token_ids
    engine.shutdown()
    with pytest.raises(RuntimeError, match="shutdown"):
        engine.generate(requests_mixed[:1], greedy)


@pytest.mark.gpu
def test_gpu_batched_parity_and_teacher_forced_logprobs(tokenizer, requests_mixed):
    model = build_model(tokenizer).cuda()
    sampling = SamplingParams(temperature=0.0, max_new_tokens=8)
    single = HFRolloutEngine(model, tokenizer, batch_size=1).generate(requests_mixed, sampling)
    batched = HFRolloutEngine(model, tokenizer, batch_size=4).generate(requests_mixed, sampling)
    assert [c.token_ids for c in single] == [c.token_ids for c in batched]
    sampled = HFRolloutEngine(model, tokenizer, batch_size=4, stop_token_ids=[10_000]).generate(
        requests_mixed, SamplingParams(temperature=0.7, max_new_tokens=8, seed=5))
    for req, comp in zip(requests_mixed, sampled):
        req_cuda = GenerationRequest(**{**req.__dict__, "pixel_values": None if req.pixel_values is None else req.pixel_values.cuda(),
                                        "image_grid_thw": None if req.image_grid_thw is None else req.image_grid_thw.cuda()})
        expected = teacher_forced_logprobs(model, req_cuda, comp.token_ids, 0.7, "cuda")
        torch.testing.assert_close(torch.tensor(comp.logprobs), expected.cpu(), atol=1e-4, rtol=0)


@pytest.mark.gpu
def test_sleep_moves_model_off_gpu(tokenizer, requests_mixed):
    model = build_model(tokenizer).cuda()
    engine = HFRolloutEngine(model, tokenizer)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=4)
    first = engine.generate(requests_mixed, greedy)
    engine.sleep()
    assert next(model.parameters()).device.type == "cpu"
    engine.wake()
    assert next(model.parameters()).device.type == "cuda"
    assert [c.token_ids for c in engine.generate(requests_mixed, greedy)] == [c.token_ids for c in first]


def test_engine_uses_mrope_positions_for_images(model, tokenizer, requests_mixed):
    """The engine's log-probs match the forward pass WITH M-RoPE and not the 1-D-position fallback
    transformers takes when ``mm_token_type_ids`` is missing."""
    req = requests_mixed[2]  # two images
    comp = HFRolloutEngine(model, tokenizer, stop_token_ids=[10_000]).generate(
        [req], SamplingParams(temperature=0.0, max_new_tokens=6))[0]
    ids = torch.tensor([req.prompt_ids + comp.token_ids])
    with torch.no_grad():
        flat = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=req.pixel_values,
                     image_grid_thw=req.image_grid_thw).logits[0].float()
    start = len(req.prompt_ids)
    flat_lp = torch.log_softmax(flat, -1)[torch.arange(start - 1, ids.shape[1] - 1), ids[0, start:]]
    assert (flat_lp - torch.tensor(comp.logprobs)).abs().max() > 1e-3
    torch.testing.assert_close(torch.tensor(comp.logprobs), teacher_forced_logprobs(model, req, comp.token_ids, 1.0),
                               atol=1e-5, rtol=0)


def test_update_through_megatron_exporter_matches_source(model, tokenizer, requests_mixed):
    """Megatron-layout weights (fused QKV / gate-up, padded vocab) -> export_hf_weights -> engine:
    the engine then generates exactly what the source model generates (greedy)."""
    weight_export = pytest.importorskip("care_megatron.training.megatron.weight_export")
    from care_megatron.models.weight_mapping import get_mapping, hf_to_megatron_rank_state_dict

    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    from bench_weight_sync import module_from_state_dict

    source = build_model(tokenizer, seed=5)
    megatron_state = hf_to_megatron_rank_state_dict(source.state_dict(), source.config, 1, 0,
                                                    spec=get_mapping(source.config.model_type))
    buckets = list(weight_export.export_hf_weights(module_from_state_dict(megatron_state), source.config,
                                                   bucket_bytes=64 << 10))
    assert len(buckets) > 1
    engine = HFRolloutEngine(model, tokenizer, batch_size=4)
    engine.update_weights(pair for bucket in buckets for pair in bucket)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=10)
    expected = HFRolloutEngine(source, tokenizer, batch_size=4).generate(requests_mixed, greedy)
    assert [c.token_ids for c in engine.generate(requests_mixed, greedy)] == [c.token_ids for c in expected]
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_fast_decode_path_is_bitwise_the_reference(model, tokenizer, requests_mixed, temperature, monkeypatch):
    """The CPU fast path (K/V heads shared through SDPA's enable_gqa, no repeat_kv copies) gives the
    same completions and the same log-probs, bit for bit, under the same seed; it is really taken."""
    from care_megatron.rollout import hf_engine

    calls = []
    original = hf_engine.gqa_sdpa_attention

    def spy(*args, **kwargs):
        calls.append(args[1].shape[2])  # query length: prefill, then 1 per decoding step
        return original(*args, **kwargs)

    monkeypatch.setattr(hf_engine, "gqa_sdpa_attention", spy)
    sampling = SamplingParams(temperature=temperature, max_new_tokens=12, seed=7)
    reference = HFRolloutEngine(model, tokenizer, batch_size=3, decode_path="reference").generate(requests_mixed, sampling)
    assert calls == []
    fast = HFRolloutEngine(model, tokenizer, batch_size=3).generate(requests_mixed, sampling)
    assert calls and 1 in calls and max(calls) > 1
    assert model.config.get_text_config()._attn_implementation == "sdpa"  # restored after generate
    assert [c.token_ids for c in fast] == [c.token_ids for c in reference]
    assert [c.logprobs for c in fast] == [c.logprobs for c in reference]
    assert [c.finish_reason for c in fast] == [c.finish_reason for c in reference]


def test_decode_path_is_validated(model, tokenizer):
    with pytest.raises(ValueError, match="decode_path"):
        HFRolloutEngine(model, tokenizer, decode_path="turbo")


@pytest.mark.parametrize("name, arch", [("tiny_qwen2_5_vl", "qwen2_5_vl"), ("tiny_qwen3_vl", "qwen3_vl")])
def test_fast_decode_path_is_bitwise_the_reference_on_registry_models(name, arch):
    """Same on the project's tiny models with the real prompt builder (Qwen3-VL has its own attention
    module, interleaved M-RoPE and DeepStack)."""
    from care_megatron.config.schema import ModelConfig
    from care_megatron.data.prompting import build_prompt
    from care_megatron.models.registry import build_model_and_processor

    model, tok, processor = build_model_and_processor(ModelConfig(name=name, arch=arch), min_pixels=28 * 28,
                                                      max_pixels=56 * 56)
    requests = []
    for i, (question, n_images) in enumerate([("How many shapes?", 1), ("What is 2 + 3?", 0), ("Which bar?", 2)]):
        p = build_prompt(question, [make_image(10 * i + k, 56 - 28 * k) for k in range(n_images)], tok, processor)
        requests.append(GenerationRequest(request_id=f"r{i}", prompt_ids=p.prompt_ids, prompt_text=p.prompt_text,
                                          images=p.images, pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw))
    sampling = SamplingParams(temperature=1.0, max_new_tokens=10, seed=5)
    runs = {path: HFRolloutEngine(model.eval(), tok, batch_size=3, decode_path=path).generate(requests, sampling)
            for path in ("reference", "fast")}
    assert [c.token_ids for c in runs["fast"]] == [c.token_ids for c in runs["reference"]]
    assert [c.logprobs for c in runs["fast"]] == [c.logprobs for c in runs["reference"]]
