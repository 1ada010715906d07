"""RGR request building (spec section 5) and its bookkeeping."""
import pytest
import torch

from care_megatron.rollout.base import SamplingParams
from care_megatron.rollout.hf_engine import HFRolloutEngine, multimodal_token_types
from care_megatron.rollout.reflection import (
    REPAIR_CUE,
    RGRStats,
    build_reflection_request,
    reflected_response_text,
    reflection_prefix_text,
)
from _rollout_helpers import make_image, make_request


def test_cue_is_the_spec_text():
    import os

    spec_path = "/work/shared/CARE_SPEC.md"
    if not os.path.exists(spec_path):
        pytest.skip("spec not available on this machine")
    assert " ".join(REPAIR_CUE.split()) in " ".join(open(spec_path).read().split())


def test_prefix_inserts_cue_before_think_close_and_drops_answer():
    response = "<think> 2 + 3 = 6 so 6 </think> <answer> 6 </answer>"
    assert reflection_prefix_text(response, cue="CUE") == "<think> 2 + 3 = 6 so 6\nCUE\n"


def test_prefix_without_think_close_appends_cue():
    assert reflection_prefix_text("<think> 2 + 3 <answer> 6 </answer>", cue="CUE") == "<think> 2 + 3\nCUE\n"
    assert reflection_prefix_text("no tags at all", cue="CUE") == "no tags at all\nCUE\n"
    assert reflection_prefix_text("<answer> 6 </answer>", cue="CUE") == "CUE\n"


def test_prefix_uses_last_think_close_before_answer():
    response = "<think> a </think> b </think> <answer> 1 </answer> </think>"
    assert reflection_prefix_text(response, cue="C") == "<think> a </think> b\nC\n"


def test_reflection_request_keeps_prompt_and_images(tokenizer, image_processor):
    original = make_request(tokenizer, image_processor, "q7", "count", [make_image(0)])
    req = build_reflection_request(original, "<think> 2 + 3 </think> <answer> 6 </answer>", tokenizer)
    assert req.request_id == "q7/rgr"
    assert req.prompt_ids == original.prompt_ids and req.prompt_text == original.prompt_text
    assert req.pixel_values is original.pixel_values and req.image_grid_thw is original.image_grid_thw
    expected_text = "<think> 2 + 3\n" + REPAIR_CUE + "\n"
    assert req.prefix_ids == tokenizer.encode(expected_text, add_special_tokens=False)
    assert tokenizer.convert_tokens_to_ids("</think>") not in req.prefix_ids
    with pytest.raises(ValueError, match="already has a prefix"):
        build_reflection_request(req, "x", tokenizer)


def test_reflection_request_decodes_only_the_continuation(model, tokenizer, image_processor):
    original = make_request(tokenizer, image_processor, "q", "count", [make_image(0)])
    req = build_reflection_request(original, "<think> 2 + 3 </think> <answer> 6 </answer>", tokenizer)
    engine = HFRolloutEngine(model, tokenizer, stop_token_ids=[10_000])
    comp = engine.generate([req], SamplingParams(temperature=0.0, max_new_tokens=5))[0]
    assert len(comp.token_ids) == 5  # only new tokens, the prefix is not returned
    ids = torch.tensor([req.prompt_ids + req.prefix_ids])
    full = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=req.pixel_values,
                          image_grid_thw=req.image_grid_thw,
                          mm_token_type_ids=multimodal_token_types(ids, model.config), max_new_tokens=5, do_sample=False,
                          eos_token_id=[10_000], pad_token_id=engine.pad_token_id,
                          suppress_tokens=engine.suppressed_token_ids)
    assert comp.token_ids == full[0, ids.shape[1]:].tolist()
    assert reflected_response_text("<think> a\n", "b </think>") == "<think> a\nb </think>"


def test_rgr_stats_rates():
    stats = RGRStats()
    assert stats.record_group(has_positive=True, num_hard_negatives=2)
    assert not stats.record_group(has_positive=False, num_hard_negatives=3)  # all-negative: rescue, not RGR
    assert not stats.record_group(has_positive=True, num_hard_negatives=0)
    assert stats.record_group(has_positive=True, num_hard_negatives=1)
    assert not stats.record_group(has_positive=True, num_hard_negatives=1, enabled=False)
    stats.record_outcome(1.0)
    stats.record_outcome(0.0)
    m = stats.metrics()
    assert m["rgr/trigger_rate"] == pytest.approx(2 / 5)
    assert m["rgr/success_rate"] == pytest.approx(1 / 2)
    assert stats.reasons == {"no_positive": 1, "no_negative": 1, "disabled": 1}
    assert RGRStats().metrics()["rgr/success_rate"] == 0.0
