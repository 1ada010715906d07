"""RGR request building (docs/algorithm.md section 5) and the paper's RGR controls (rgr_mode)."""
import pytest
import torch

from care_megatron.rollout.base import SamplingParams
from care_megatron.rollout.hf_engine import HFRolloutEngine, multimodal_token_types
from care_megatron.rollout.reflection import (
    REPAIR_CUE,
    build_reflection_request,
    build_rgr_request,
    reflected_response_text,
    reflection_prefix_text,
)
from _rollout_helpers import make_image, make_request


def test_cue_is_the_papers_text():
    # the cue of the paper's section 3.6 / docs/algorithm.md, word for word
    assert REPAIR_CUE == ("Your previous reasoning was incorrect. Identify the failing operation, correct it, and "
                          "re-derive the necessary quantities. Keep this section concise. Do not restate the question.")


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


def test_rgr_modes_repair_resample_fresh(tokenizer, image_processor):
    """repair = rationale + cue; resample = the same truncated rationale, no cue; fresh = the bare prompt."""
    original = make_request(tokenizer, image_processor, "q3", "count", [make_image(0)])
    negative = "<think> 2 + 3 = 6 </think> <answer> 6 </answer>"
    repair = build_rgr_request(original, negative, tokenizer, "repair")
    resample = build_rgr_request(original, negative, tokenizer, "resample")
    fresh = build_rgr_request(original, negative, tokenizer, "fresh")
    assert repair.prefix_ids == tokenizer.encode("<think> 2 + 3 = 6\n" + REPAIR_CUE + "\n", add_special_tokens=False)
    assert resample.prefix_ids == tokenizer.encode("<think> 2 + 3 = 6\n", add_special_tokens=False)
    assert fresh.prefix_ids == []
    for req in (repair, resample, fresh):
        assert req.request_id == "q3/rgr" and req.prompt_ids == original.prompt_ids
        assert req.pixel_values is original.pixel_values
    assert reflection_prefix_text("<answer> 6 </answer>", cue="") == ""
    with pytest.raises(ValueError, match="unknown RGR mode"):
        build_rgr_request(original, negative, tokenizer, "retry")
    with pytest.raises(ValueError, match="already has a prefix"):
        build_rgr_request(repair, negative, tokenizer, "fresh")
