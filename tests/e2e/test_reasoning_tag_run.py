"""``data.think_tag=reasoning`` end to end on the tiny Qwen3-VL model (the CARE paper's appendix 8.2:
Qwen3-VL-8B writes its rationale in ``<reasoning>`` tags).

The scripted step of ``test_scripted_step.py`` (same script, same closed forms) with every scripted
response written in ``<reasoning>`` tags: the rewards (format included), the RGR prefix, the region of
every trained token, CARE's think weights and ``length/think_mean`` must come out as they do for
``<think>``, with the think region now the ``<reasoning>`` span (several tokens per tag in the tiny
vocabulary, where ``<think>`` is one). Then one SFT step: its targets are written in ``<reasoning>`` tags.
"""
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_scripted_step import EXPECTED_REWARDS, SCRIPTED, closed_form_weights, run_scripted_step  # noqa: E402

from care_megatron.config import load_config  # noqa: E402
from care_megatron.rewards.regions import Region  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
QWEN3_REASONING = ["model.name=tiny_qwen3_vl", "model.arch=qwen3_vl", "data.min_pixels=4096", "data.max_pixels=4096",
                   "data.think_tag=reasoning"]
THINK_SPAN = re.compile(r"<reasoning>.*?</reasoning>", re.S)


@pytest.fixture(scope="module")
def reasoning_run(tmp_path_factory):
    return run_scripted_step(tmp_path_factory.mktemp("reasoning"), *QWEN3_REASONING, steps=1)


def _decode_each(tokenizer, ids) -> str:
    return "".join(tokenizer.decode([int(i)]) for i in ids)


def test_prompts_ask_for_reasoning_and_rollouts_earn_the_format_reward(reasoning_run):
    trainer, metrics, captured = reasoning_run
    assert trainer.model.config.model_type.startswith("qwen3_vl")
    requests = trainer.engine.requests
    assert requests and all("<reasoning>" in r.prompt_text and "<think>" not in r.prompt_text for r in requests)
    rollouts, _ = captured["advantages"][1]
    assert all("<think>" not in r.response_text for r in rollouts)
    # the same rewards as the <think> script: format 1 for every well-formed <reasoning> response, and the
    # successful reflection (row 16) scores 1.0, so its prefix was cut at </reasoning>
    assert [r.reward for r in rollouts] == pytest.approx(EXPECTED_REWARDS, abs=1e-6)
    assert [r.format for r in rollouts[:16]] == [0.0] + [1.0] * 8 + [0.0] * 3 + [1.0] * 4
    assert metrics[0]["format/mean"] == pytest.approx(12 / 16)
    rgr = [r for r in requests if r.request_id.endswith("/rgr")]
    from care_megatron.rollout.reflection import REPAIR_CUE

    prefix = trainer.tokenizer.decode(rgr[0].prefix_ids)
    assert prefix.startswith("<reasoning>count ") and prefix.endswith("\n" + REPAIR_CUE + "\n")
    assert "</reasoning>" not in prefix and "<answer>" not in prefix


def test_think_region_is_exactly_the_reasoning_span_and_weighs_like_think(reasoning_run):
    trainer, _, captured = reasoning_run
    tokenizer = trainer.tokenizer
    rollouts, _ = captured["advantages"][1]
    packed, _ = captured["packed"][0]
    seen, positive_think_tokens = set(), 0
    for mb in packed:
        seq_ids = mb.token_sequence_ids()
        for local, row in enumerate(mb.sequence_indices.tolist()):
            tokens = seq_ids == local
            response = mb.loss_mask[tokens].bool()
            regions = mb.region_ids[tokens]
            ids = mb.input_ids[tokens]
            think_text = _decode_each(tokenizer, ids[(regions == int(Region.THINK)) & response])
            rollout = rollouts[row]
            continuation = tokenizer.decode(rollout.completion.token_ids[:-1])  # stop token dropped
            if rollout.prefix_ids:  # RGR: the prefix opened <reasoning>; the continuation closes it
                expected = continuation[:continuation.index("</reasoning>") + len("</reasoning>")]
            else:
                span = THINK_SPAN.search(continuation)
                expected = span.group(0) if span else ""
            assert think_text == expected, row
            answer_text = _decode_each(tokenizer, ids[(regions == int(Region.ANSWER)) & response])
            answer = re.search(r"<answer>.*?</answer>", continuation)
            assert answer_text == (answer.group(0) if answer else ""), row
            assert not ((regions != int(Region.OTHER)) & ~response).any()  # prompt / RGR prefix tokens are OTHER
            weights = closed_form_weights(regions, response, rollout.correct)
            assert torch.allclose(mb.token_fields["token_weights"][tokens], weights), row
            if rollout.correct and expected:
                n = len(tokenizer.encode(expected, add_special_tokens=False))
                assert int((mb.token_fields["token_weights"][tokens] == 0.005).sum()) == n > 4, row
                positive_think_tokens += n
            seen.add(row)
    assert seen == set(range(18)) and positive_think_tokens > 0


def test_think_length_counts_reasoning_tokens(reasoning_run):
    trainer, metrics, captured = reasoning_run
    tokenizer = trainer.tokenizer
    rollouts, _ = captured["advantages"][1]
    lengths = []
    for rollout in rollouts[:16]:  # length/think_mean: the G original rollouts per prompt
        span = THINK_SPAN.search(rollout.response_text)
        lengths.append(len(tokenizer.encode(span.group(0), add_special_tokens=False)) if span else 0)
        assert rollout.think_length == lengths[-1]
    # every tag is several tokens here (one for <think>): 12 rationales, at least 2 x 4 tag tokens each
    assert sum(lengths) / 16 > 12 * 8 / 16
    assert metrics[0]["length/think_mean"] == pytest.approx(sum(lengths) / 16)


def test_the_trainer_grades_and_reads_regions_with_the_reasoning_tags_only(reasoning_run):
    from care_megatron.experience import make_rollout
    from care_megatron.rollout.base import Completion

    trainer, _, captured = reasoning_run
    rollouts, _ = captured["advantages"][1]
    think = trainer.reward_fn("<think>so 3</think><answer>3</answer>", "3", answer_type="integer")
    reasoning = trainer.reward_fn("<reasoning>so 3</reasoning><answer>3</answer>", "3", answer_type="integer")
    assert (think.accuracy, think.format, reasoning.format) == (1.0, 0.0, 1.0)
    ids = trainer.tokenizer.encode("<think>so 3</think><answer>3</answer>", add_special_tokens=False)
    completion = Completion(request_id="x", token_ids=ids, text="", logprobs=[0.0] * len(ids), finish_reason="stop")
    rollout = make_rollout(0, rollouts[0].record, rollouts[0].prompt, completion, trainer.tokenizer, trainer.reward_fn,
                           set())
    assert rollout.think_length == 0 and rollout.answer_length == 3 and rollout.format == 0.0


def test_sft_targets_are_written_in_reasoning_tags(tmp_path, monkeypatch):
    import care_megatron.sft as sft

    config = load_config(ROOT / "examples/configs/tiny_cpu_shapes.yaml", [
        *SCRIPTED, *QWEN3_REASONING, f"train.output_dir={tmp_path}", "train.sft_steps=1", "train.sft_batch_size=2"])
    built = []
    real = sft.sft_sequence

    def capture(record, tokenizer, *args, **kwargs):
        seq = real(record, tokenizer, *args, **kwargs)
        built.append((record, tokenizer, seq))
        return seq

    monkeypatch.setattr(sft, "sft_sequence", capture)
    out = sft.run_sft(config, progress=False)
    assert (out / "config.json").exists() and len(built) == 2
    for record, tokenizer, seq in built:
        prompt = tokenizer.decode(seq.input_ids[~seq.loss_mask])
        assert "<reasoning>" in prompt and "<think>" not in prompt
        response = seq.input_ids[seq.loss_mask]
        expected = f"<reasoning>{record.rationale}</reasoning><answer>{record.answer}</answer>"
        assert tokenizer.decode(response[:-1]) == expected and record.rationale
        think = seq.region_ids[seq.loss_mask] == int(Region.THINK)
        assert _decode_each(tokenizer, response[think]) == f"<reasoning>{record.rationale}</reasoning>"
