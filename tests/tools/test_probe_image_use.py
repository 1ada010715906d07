"""tools/probe_image_use.py: a policy whose vision tower emits nothing scores the true and a swapped image
exactly the same; an untrained random policy does not."""
import pytest
import torch
from _tool_loader import load_tool


@pytest.fixture(scope="module")
def tool():
    return load_tool("probe_image_use")


@pytest.fixture(scope="module")
def pieces():
    from care_megatron.config.loader import load_config
    from care_megatron.data.dataset import build_records
    from care_megatron.models.registry import build_model_and_processor

    config = load_config(None, ["data.tasks=[compare_lengths,tallest_bar]", "data.train_size=4", "data.eval_size=6"])
    model, tokenizer, processor = build_model_and_processor(config.model, min_pixels=config.data.min_pixels,
                                                            max_pixels=config.data.max_pixels)
    return model, tokenizer, processor, build_records(config.data).eval


def test_blind_policy_scores_swapped_images_the_same(tool, pieces):
    import copy

    model, tokenizer, processor, records = pieces
    blind = copy.deepcopy(model)
    last = [m for m in blind.model.visual.merger.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    report = tool.probe(blind, tokenizer, processor, records, None)
    assert set(report) == {"compare_lengths", "tallest_bar"}
    for row in report.values():
        assert row["records"] == 3
        assert row["nll_true_image"] == row["nll_swapped_image"] and row["nll_gain_from_image"] == 0.0
        assert row["nll_true_image"] > 0


def test_random_policy_with_a_vision_tower_scores_them_differently(tool, pieces):
    model, tokenizer, processor, records = pieces
    report = tool.probe(model, tokenizer, processor, records, None, limit=2)
    assert all(row["records"] == 2 for row in report.values())
    assert all(abs(row["nll_gain_from_image"]) > 1e-6 for row in report.values())
