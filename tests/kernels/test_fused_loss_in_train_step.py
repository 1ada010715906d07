"""The fused CARE region loss inside a real training step (TorchBackend: model forward, backward,
clip, AdamW) gives the same loss, gradient norm, clip counts and updated weights as the unfused
policy loss, for one update and for two updates per step (docs/algorithm.md section 6: the second
runs on the weights the first left, each mini-batch with its own normalisers).
On CPU the fused op runs its torch reference; the gpu-marked twin runs the Triton kernel."""
import copy

import pytest
import torch

from care_megatron.algorithm.policy_losses import PolicyLossConfig, get_policy_loss
from care_megatron.data.batch import Sequence
from care_megatron.data.packing import pack_sequences
from care_megatron.rewards.regions import Region
from care_megatron.algorithm.diagnostics import clip_fractions
from care_megatron.training.step_inputs import (attach_loss_inputs, fused_region_loss_applies, loss_normalisers,
                                                make_loss_fn)
from care_megatron.training.torch_backend import TorchBackend
from care_megatron.training.updates import merge_update_results, pack_minibatch

VOCAB = 96


def _tiny_model():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, rms_norm_eps=1e-6,
                         tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=VOCAB - 1, video_token_id=VOCAB - 2, vision_start_token_id=VOCAB - 3)
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config).float()


def _sequences(n=8):
    g = torch.Generator().manual_seed(1)
    seqs = []
    for i in range(n):
        prompt, response = 4 + i % 3, 6 + (i * 5) % 11
        length = prompt + response
        regions = torch.zeros(length, dtype=torch.long)
        cut = prompt + response // 2
        regions[prompt:cut] = int(Region.THINK)
        if i % 4 != 3:
            regions[cut:] = int(Region.ANSWER)
        mask = torch.zeros(length, dtype=torch.bool)
        mask[prompt:] = True
        seqs.append(Sequence(input_ids=torch.randint(5, VOCAB - 4, (length,), generator=g), loss_mask=mask,
                             region_ids=regions, position_ids=torch.arange(length).expand(3, length).clone()))
    return seqs


DUAL_CLIP = 1.5
"""c of the dual clip here: low enough that some negative-advantage tokens of these ratios cross it."""
SIGN_BUCKETS = ("all", "pos_adv", "neg_adv", "answer", "think", "neg_adv_answer")


def _fused_vs_plain_step(device, updates: int):
    model = _tiny_model()
    backends = {name: TorchBackend(copy.deepcopy(model), lr=1e-3, grad_clip=1.0, keep_reference=False, device=device)
                for name in ("plain", "fused")}
    sequences = _sequences()
    # the step's sequences in ``updates`` mini-batches of consecutive sequences, each packed on its own
    runs = [list(range(k * 8 // updates, (k + 1) * 8 // updates)) for k in range(updates)]
    minibatches = [pack_minibatch(sequences, run, lambda seqs: pack_sequences(seqs, token_budget=48, pad_multiple=4))
                   for run in runs]
    packed = [mb for run in minibatches for mb in run]
    g = torch.Generator().manual_seed(2)
    current = backends["plain"].forward_logprobs(packed)
    for mb, out in zip(packed, current):  # old / reference log-probs near the policy's: ratios hit both clip bounds
        old = (out.logprobs.cpu() + 0.4 * torch.randn(mb.num_tokens, generator=g)) * mb.loss_mask
        mb.token_fields["old_logprobs"] = old
        mb.token_fields["ref_logprobs"] = old - 0.1 * torch.rand(mb.num_tokens, generator=g)
    # fixed signs: four negative sequences with an answer span (negative-advantage answer tokens to clip) and
    # one without advantage (CARE's N_seq counts the others only)
    advantages = torch.randn(8, generator=g).abs() * torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0, 0.0, -1.0, -1.0])
    attach_loss_inputs(packed, "care", advantages, advantages > 0, 0.005, max_response_length=16)
    normalisers = [loss_normalisers(run, max_response_length=16) for run in minibatches]
    assert sum(n["num_advantaged_sequences"] for n in normalisers) == 7
    assert sum(n["num_sequences"] for n in normalisers) == 8
    config = PolicyLossConfig.for_method("care", kl_coef=0.02, dual_clip=DUAL_CLIP)
    assert all(fused_region_loss_applies("care", config, mb) for mb in packed)
    results = {}
    for name in ("plain", "fused"):
        loss_fn = make_loss_fn(get_policy_loss("care"), config, "care", 0.005, fused=name == "fused")
        results[name] = [backends[name].train_step(run, loss_fn, norm) for run, norm in zip(minibatches, normalisers)]
    for plain, fused in zip(results["plain"], results["fused"]):
        assert not plain.skipped and not fused.skipped and plain.loss != 0.0
        assert fused.loss == pytest.approx(plain.loss, rel=1e-5, abs=1e-7)
        assert fused.grad_norm == pytest.approx(plain.grad_norm, rel=1e-4)
        for key in [f"count/{kind}/{part}" for kind in ("tokens", "clipped") for part in SIGN_BUCKETS]:
            assert fused.metrics[key] == plain.metrics[key], key
        assert fused.metrics["count/dual_clipped"] == plain.metrics["count/dual_clipped"]
        assert fused.metrics["count/ratio_sum"] == pytest.approx(plain.metrics["count/ratio_sum"], rel=1e-5)
    # AdamW moves an entry whose gradient is about its eps (1e-8) by a fair fraction of lr on summation-order
    # noise alone; the second update compounds it (and starts from weights that differ by the first's noise)
    atol = 1e-6 if updates == 1 else 1e-5
    fused_params = dict(backends["fused"].model.named_parameters())
    for name, p in backends["plain"].model.named_parameters():
        torch.testing.assert_close(fused_params[name], p, atol=atol, rtol=1e-5,
                                   msg=lambda m: f"{name} after the step: {m}")
    merged = {name: merge_update_results(results[name]) for name in ("plain", "fused")}
    fractions = {name: clip_fractions(merged[name].metrics) for name in ("plain", "fused")}
    for key in ("clip_frac/neg_adv_answer", "clip_frac/dual", "clip_frac/all"):
        assert fractions["fused"][key] == fractions["plain"][key], key
        assert fractions["plain"][key] > 0, key  # the clips act, so the comparison says something
    if updates > 1:  # update 2's ratios are those of the weights update 1 left, not of the initial ones
        at_start = sum(float(torch.exp(out.logprobs.cpu() - mb.token_fields["old_logprobs"])[mb.loss_mask].sum())
                       for mb, out in zip(packed, current) if any(mb is m for m in minibatches[1]))
        for name in ("plain", "fused"):
            assert abs(results[name][1].metrics["count/ratio_sum"] - at_start) > 1e-3 * at_start


@pytest.mark.parametrize("updates", [1, 2])
def test_fused_region_loss_in_a_training_step_equals_unfused_cpu(updates):
    _fused_vs_plain_step("cpu", updates)


@pytest.mark.gpu
@pytest.mark.parametrize("updates", [1, 2])
def test_fused_region_loss_in_a_training_step_equals_unfused_gpu(updates):
    _fused_vs_plain_step("cuda", updates)
