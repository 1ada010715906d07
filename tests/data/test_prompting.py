"""Prompts: chat template parity, image placeholder expansion against the vision tower, sequences."""
import pytest
import torch
from PIL import Image

from care_megatron.config.schema import ModelConfig
from care_megatron.data.prompting import (
    IMAGE_PAD, SYSTEM_PROMPT, VISION_START, PromptTokenIds, build_image_processor, build_prompt, build_sequence,
    chat_messages, render_chat,
)
from care_megatron.models import build_model_and_processor, load_tokenizer
from care_megatron.rewards.regions import Region


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


@pytest.mark.parametrize("num_images", [0, 1, 3])
@pytest.mark.parametrize("system_prompt", [SYSTEM_PROMPT, None])
@pytest.mark.parametrize("images_first", [True, False])
def test_render_chat_matches_tokenizer_chat_template(tokenizer, num_images, system_prompt, images_first):
    ours = render_chat("How many red circles are there?", num_images, system_prompt, images_first=images_first)
    theirs = tokenizer.apply_chat_template(chat_messages("How many red circles are there?", num_images, system_prompt,
                                                         images_first=images_first),
                                           tokenize=False, add_generation_prompt=True)
    assert ours == theirs
    assert ours.count(IMAGE_PAD) == num_images and ours.endswith("<|im_start|>assistant\n")


def test_system_prompt_asks_for_think_and_answer():
    assert "<think>" in SYSTEM_PROMPT and "</think>" in SYSTEM_PROMPT
    assert "<answer>" in SYSTEM_PROMPT and "</answer>" in SYSTEM_PROMPT


@pytest.mark.parametrize("arch,patch", [("qwen2_5_vl", 14), ("qwen3_vl", 16)])
def test_placeholder_expansion_matches_grids(tokenizer, arch, patch):
    processor = build_image_processor(arch, min_pixels=(2 * patch) ** 2, max_pixels=(6 * patch) ** 2)
    images = [Image.new("RGB", (60, 60), "red"), Image.new("RGB", (130, 70), "blue")]
    prompt = build_prompt("Which is larger?", images, tokenizer, processor)
    ids = PromptTokenIds.from_tokenizer(tokenizer)
    grid = prompt.image_grid_thw
    assert grid.shape == (2, 3) and (grid[:, 0] == 1).all()
    assert prompt.pixel_values.shape == (int(grid.prod(-1).sum()), 3 * 2 * patch * patch)
    # image_pad runs, in order, with grid_t * grid_h * grid_w / 4 tokens each, each after <|vision_start|>
    tokens = torch.tensor(prompt.prompt_ids)
    starts = (tokens == ids.vision_start_token_id).nonzero().flatten().tolist()
    assert len(starts) == 2
    for start, row in zip(starts, grid.tolist()):
        count = row[0] * row[1] * row[2] // 4
        assert tokens[start + 1: start + 1 + count].eq(ids.image_token_id).all()
        assert tokens[start + 1 + count] == ids.vision_end_token_id
    assert prompt.num_image_tokens == int((tokens == ids.image_token_id).sum())
    assert prompt.prompt_text.count(IMAGE_PAD) == 2 and prompt.prompt_text.count(VISION_START) == 2
    expanded = tokenizer.decode(prompt.prompt_ids)
    assert expanded.replace(IMAGE_PAD, "") == prompt.prompt_text.replace(IMAGE_PAD, "")


@pytest.mark.parametrize("name,arch,pixels", [("tiny_qwen2_5_vl", "qwen2_5_vl", 56 * 56), ("tiny_qwen3_vl", "qwen3_vl", 64 * 64)])
def test_hf_model_accepts_prompt_and_token_count_equals_vision_rows(name, arch, pixels):
    model, tokenizer, processor = build_model_and_processor(ModelConfig(name=name, arch=arch), min_pixels=pixels,
                                                            max_pixels=4 * pixels)
    model.eval()
    images = [Image.new("RGB", (56, 56), "red"), Image.new("RGB", (112, 56), "green")]
    prompt = build_prompt("Count the shapes.", images, tokenizer, processor)
    with torch.no_grad():
        rows = model.model.get_image_features(prompt.pixel_values, prompt.image_grid_thw).pooler_output
        ids = torch.tensor([prompt.prompt_ids])
        logits = model(input_ids=ids, pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw,
                       mm_token_type_ids=(ids == model.config.image_token_id).int()).logits
    assert [r.shape[0] for r in rows] == (prompt.image_grid_thw.prod(-1) // 4).tolist()
    assert sum(r.shape[0] for r in rows) == prompt.num_image_tokens
    assert logits.shape == (1, len(prompt), len(tokenizer)) and torch.isfinite(logits).all()
    if arch == "qwen2_5_vl":  # the 56x56 image of the embedded default: 4x4 patches -> 4 image tokens
        assert prompt.image_grid_thw[0].tolist() == [1, 4, 4]


def test_build_sequence_masks_regions_and_fields(tokenizer):
    processor = build_image_processor("qwen2_5_vl", min_pixels=56 * 56, max_pixels=56 * 56)
    prompt = build_prompt("Q?", [Image.new("RGB", (56, 56))], tokenizer, processor)
    response = tokenizer("<think>a b</think><answer>4</answer><|im_end|>", add_special_tokens=False)["input_ids"]
    regions = [1] * 4 + [2] * 3 + [0]
    assert len(response) == len(regions)
    old = torch.randn(len(response))
    seq = build_sequence(prompt, response, regions, token_fields={"old_logprobs": old}, sequence_id=7)
    p = len(prompt)
    assert torch.equal(seq.input_ids, torch.tensor(prompt.prompt_ids + response))
    assert not seq.loss_mask[:p].any() and seq.loss_mask[p:].all()
    assert (seq.region_ids[:p] == Region.OTHER).all() and seq.region_ids[p:].tolist() == regions
    assert torch.equal(seq.token_fields["old_logprobs"][p:], old) and (seq.token_fields["old_logprobs"][:p] == 0).all()
    assert seq.position_ids is None and seq.sequence_id == 7 and torch.equal(seq.image_grid_thw, prompt.image_grid_thw)
    with pytest.raises(ValueError, match="entries for 8 response tokens"):
        build_sequence(prompt, response, regions[:-1])
    with pytest.raises(ValueError, match="outside Region"):
        build_sequence(prompt, response, [5] * len(response))


def test_data_system_prompt_reaches_sft_sequences_and_evaluation_prompts(tokenizer):
    """``data.system_prompt``: None = the package instruction, "" = no system turn, text = that text;
    SFT sequences and held-out prompts carry the same turn (RL prompts go through the trainer's copy)."""
    from care_megatron.config.loader import load_config
    from care_megatron.data.prompting import resolve_system_prompt
    from care_megatron.data.synthetic import generate
    from care_megatron.sft import sft_sequence

    assert resolve_system_prompt(None) == SYSTEM_PROMPT
    assert resolve_system_prompt("") is None
    assert resolve_system_prompt("Be brief.") == "Be brief."
    assert load_config(None, ["data.system_prompt=Be brief."]).data.system_prompt == "Be brief."
    processor = build_image_processor("qwen2_5_vl", min_pixels=56 * 56, max_pixels=56 * 56)
    record = generate("compare_lengths", 1, seed=0)[0]
    lengths = {}
    for value in (None, "", "Be brief."):
        seq = sft_sequence(record, tokenizer, processor, 0, system_prompt=resolve_system_prompt(value))
        prompt = build_prompt(record.question, record.images, tokenizer, processor, system_prompt=resolve_system_prompt(value))
        text = tokenizer.decode(seq.input_ids[: len(prompt.prompt_ids)])
        assert list(seq.input_ids[: len(prompt.prompt_ids)]) == list(prompt.prompt_ids)
        assert ("<|im_start|>system" in text) == (value != "")
        lengths[value] = len(prompt.prompt_ids)
    assert lengths[""] < lengths["Be brief."] < lengths[None]


def test_care_eval_prompts_carry_data_system_prompt(tmp_path, monkeypatch):
    """``care-eval`` (run_evaluation) builds its held-out prompts with the run's ``data.system_prompt``,
    as training and the trainer's own evaluation do."""
    from care_megatron.config.loader import load_config
    from care_megatron.evaluation import scoring
    from care_megatron.evaluation.run import run_evaluation

    seen = []

    def recording_build_prompt(*args, **kwargs):
        seen.append(kwargs.get("system_prompt"))
        return build_prompt(*args, **kwargs)

    monkeypatch.setattr(scoring, "build_prompt", recording_build_prompt)
    config = load_config(None, ["data.tasks=[compare_lengths]", "data.train_size=2", "data.eval_size=2",
                                "rollout.max_new_tokens=2", f"train.output_dir={tmp_path}", "train.init_from=null",
                                "data.system_prompt=Be brief."])
    report = run_evaluation(config, progress=False)
    assert report.num_examples == 2 and seen == ["Be brief.", "Be brief."]


def test_care_eval_prompts_and_regions_follow_data_think_tag(tmp_path, monkeypatch):
    """``care-eval`` with ``data.think_tag=reasoning``: the package instruction asks for <reasoning>, and the
    responses' regions (held-out think length) and format are read with the reasoning tags."""
    from care_megatron.config.loader import load_config
    from care_megatron.evaluation import scoring
    from care_megatron.evaluation.run import run_evaluation
    from care_megatron.rewards.parsing import REASONING_TAGS, regions_from_token_ids

    prompts, tags = [], []

    def recording_build_prompt(*args, **kwargs):
        prompts.append(kwargs.get("system_prompt"))
        return build_prompt(*args, **kwargs)

    def recording_regions(ids, tokenizer, tag_config):
        tags.append(tag_config)
        return regions_from_token_ids(ids, tokenizer, tag_config)

    monkeypatch.setattr(scoring, "build_prompt", recording_build_prompt)
    monkeypatch.setattr(scoring, "regions_from_token_ids", recording_regions)
    config = load_config(None, ["data.tasks=[compare_lengths]", "data.train_size=2", "data.eval_size=2",
                                "rollout.max_new_tokens=2", f"train.output_dir={tmp_path}", "train.init_from=null",
                                "data.think_tag=reasoning"])
    assert run_evaluation(config, progress=False).num_examples == 2
    assert len(prompts) == 2 and all("<reasoning>" in p and "<think>" not in p for p in prompts)
    assert tags == [REASONING_TAGS, REASONING_TAGS]
