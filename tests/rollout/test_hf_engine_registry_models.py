"""HFRolloutEngine on the project's registry models (tiny Qwen2.5-VL and Qwen3-VL, real prompt builder)."""
import pytest
import torch

from care_megatron.rollout.base import GenerationRequest, SamplingParams
from care_megatron.rollout.hf_engine import HFRolloutEngine, multimodal_token_types
from _rollout_helpers import make_image

registry = pytest.importorskip("care_megatron.models.registry")
prompting = pytest.importorskip("care_megatron.data.prompting")


@pytest.fixture(scope="module", params=[("tiny_qwen2_5_vl", "qwen2_5_vl"), ("tiny_qwen3_vl", "qwen3_vl")], ids=lambda p: p[1])
def stack(request):
    from care_megatron.config.schema import ModelConfig

    name, arch = request.param
    model, tokenizer, image_processor = registry.build_model_and_processor(
        ModelConfig(name=name, arch=arch), min_pixels=28 * 28, max_pixels=56 * 56)
    model.eval()
    reqs = []
    for i, (question, n_images) in enumerate([("How many shapes?", 1), ("What is 2 + 3?", 0), ("Which bar is tallest?", 2)]):
        p = prompting.build_prompt(question, [make_image(10 * i + k, 56 - 28 * k) for k in range(n_images)],
                                   tokenizer, image_processor)
        reqs.append(GenerationRequest(request_id=f"r{i}", prompt_ids=p.prompt_ids, prompt_text=p.prompt_text,
                                      images=p.images, pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw))
    return model, tokenizer, reqs


def test_batched_equals_single_and_logprobs_match_forward(stack):
    model, tokenizer, reqs = stack
    sampling = SamplingParams(temperature=0.0, max_new_tokens=8)
    single = HFRolloutEngine(model, tokenizer, batch_size=1).generate(reqs, sampling)
    batched = HFRolloutEngine(model, tokenizer, batch_size=3).generate(reqs, sampling)
    for req, a, b in zip(reqs, single, batched):
        assert a.token_ids == b.token_ids and len(a.token_ids) >= 1
        ids = torch.tensor([req.prompt_ids + a.token_ids])
        kwargs = {} if req.pixel_values is None else dict(
            pixel_values=req.pixel_values, image_grid_thw=req.image_grid_thw,
            mm_token_type_ids=multimodal_token_types(ids, model.config))
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).logits[0].float()
        start = len(req.prompt_ids)
        expected = torch.log_softmax(logits, -1)[torch.arange(start - 1, ids.shape[1] - 1), ids[0, start:]]
        torch.testing.assert_close(torch.tensor(b.logprobs), expected, atol=1e-5, rtol=0)
