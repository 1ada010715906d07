"""M-RoPE positions: closed-form example and parity with transformers' get_rope_index (both Qwen-VL families)."""
import pytest
import torch

from care_megatron.config.schema import ModelConfig
from care_megatron.data.packing import MRopeSpec, mrope_position_ids
from care_megatron.models import build_model_and_processor

VS, VE, PAD = 5, 6, 7  # made-up ids for the closed-form example


def test_closed_form_single_image_then_text():
    # [<vs>, 4 image tokens of a 1x4x4 grid (2x2 after merge), <ve>, text, text]
    ids = torch.tensor([VS, PAD, PAD, PAD, PAD, VE, 11, 12])
    pos = mrope_position_ids(ids, torch.tensor([[1, 4, 4]]), 2, PAD, VS)
    expected = torch.tensor([
        [0, 1, 1, 1, 1, 3, 4, 5],  # temporal: image at start 1, text resumes at 1 + max(2, 2)
        [0, 1, 1, 2, 2, 3, 4, 5],  # height: row index
        [0, 1, 2, 1, 2, 3, 4, 5],  # width: column index
    ])
    assert torch.equal(pos, expected)


def test_text_only_is_arange_on_three_rows():
    ids = torch.tensor([3, 4, 9, 9, 2])
    assert torch.equal(mrope_position_ids(ids, None, 2, PAD, VS), torch.arange(5).expand(3, 5))


def test_wide_image_advances_by_longest_side():
    # grid 1x2x6 -> merged 1x3 -> next text at start + 3
    ids = torch.tensor([1, VS, PAD, PAD, PAD, VE])
    pos = mrope_position_ids(ids, torch.tensor([[1, 2, 6]]), 2, PAD, VS)
    assert pos[:, 2:5].tolist() == [[2, 2, 2], [2, 2, 2], [2, 3, 4]]
    assert pos[:, 5].tolist() == [5, 5, 5]


@pytest.mark.parametrize("bad", ["count", "contiguous", "vision_start"])
def test_malformed_image_blocks_raise(bad):
    grid = torch.tensor([[1, 4, 4]])
    ids = {
        "count": torch.tensor([VS, PAD, PAD, PAD, VE]),
        "contiguous": torch.tensor([VS, PAD, PAD, 9, PAD, PAD, VE]),
        "vision_start": torch.tensor([1, PAD, PAD, PAD, PAD, VE]),
    }[bad]
    with pytest.raises(ValueError):
        mrope_position_ids(ids, grid, 2, PAD, VS)


@pytest.fixture(scope="module", params=[("tiny_qwen2_5_vl", "qwen2_5_vl"), ("tiny_qwen3_vl", "qwen3_vl")])
def tiny_model(request):
    name, arch = request.param
    model, tokenizer, _ = build_model_and_processor(ModelConfig(name=name, arch=arch))
    return model


def _random_sequence(generator, config, grids, text_lens):
    """Text / image blocks alternating: text_lens[0], image 0, text_lens[1], image 1, ..., text_lens[-1]."""
    pieces = []
    vocab_low, vocab_high = 20, 900  # ordinary BPE ids of the tiny tokenizer
    for k, n in enumerate(text_lens):
        pieces.append(torch.randint(vocab_low, vocab_high, (n,), generator=generator))
        if k < len(grids):
            t, h, w = grids[k]
            count = t * h * w // config.vision_config.spatial_merge_size ** 2
            pieces.append(torch.tensor([config.vision_start_token_id] + [config.image_token_id] * count
                                       + [config.vision_end_token_id]))
    return torch.cat(pieces)


CASES = [
    ([], [17]),  # text only
    ([(1, 4, 4)], [5, 9]),  # one image, text after it
    ([(1, 4, 6), (1, 8, 4)], [3, 2, 12]),  # two images of different shapes
    ([(1, 2, 2), (1, 6, 6), (1, 4, 10)], [1, 0, 4, 7]),  # three images, two adjacent blocks
    ([(2, 4, 4)], [2, 0]),  # t = 2 grid, nothing after the image block but <vision_end>
]


@pytest.mark.parametrize("grids,text_lens", CASES)
def test_matches_transformers_get_rope_index(tiny_model, grids, text_lens):
    config = tiny_model.config
    generator = torch.Generator().manual_seed(len(text_lens))
    ids = _random_sequence(generator, config, grids, text_lens)
    grid = torch.tensor(grids) if grids else None
    spec = MRopeSpec.from_hf_config(config)
    ours = mrope_position_ids(ids, grid, spec.spatial_merge_size, spec.image_token_id, spec.vision_start_token_id,
                              arch=spec.arch)
    if grid is None:
        # transformers falls back to plain positions for text-only input (no rope index call)
        reference = torch.arange(ids.numel()).expand(3, -1)
    else:
        mm_types = (ids == config.image_token_id).int()[None]
        reference, _ = tiny_model.model.get_rope_index(ids[None], mm_types, image_grid_thw=grid)
        reference = reference[:, 0]
    assert ours.dtype == torch.long and ours.shape == (3, ids.numel())
    assert torch.equal(ours, reference)
