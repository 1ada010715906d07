"""The fused CARE region loss inside a real training step (TorchBackend: model forward, backward,
clip, AdamW) gives the same loss, gradient norm and updated weights as the unfused policy loss.
On CPU the fused op runs its torch reference; the gpu-marked twin runs the Triton kernel."""
import copy

import pytest
import torch

from care_megatron.algorithm.policy_losses import PolicyLossConfig, get_policy_loss
from care_megatron.data.batch import Sequence
from care_megatron.data.packing import pack_sequences
from care_megatron.rewards.regions import Region
from care_megatron.training.step_inputs import attach_loss_inputs, fused_region_loss_applies, make_loss_fn
from care_megatron.training.torch_backend import TorchBackend

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


def _fused_vs_plain_step(device):
    model = _tiny_model()
    backends = {name: TorchBackend(copy.deepcopy(model), lr=1e-3, grad_clip=1.0, keep_reference=False, device=device)
                for name in ("plain", "fused")}
    packed = pack_sequences(_sequences(), token_budget=48, pad_multiple=4)
    g = torch.Generator().manual_seed(2)
    current = backends["plain"].forward_logprobs(packed)
    for mb, out in zip(packed, current):  # old / reference log-probs near the policy's: ratios hit both clip bounds
        old = (out.logprobs.cpu() + 0.4 * torch.randn(mb.num_tokens, generator=g)) * mb.loss_mask
        mb.token_fields["old_logprobs"] = old
        mb.token_fields["ref_logprobs"] = old - 0.1 * torch.rand(mb.num_tokens, generator=g)
    advantages = torch.randn(8, generator=g)
    normalisers, _ = attach_loss_inputs(packed, "care", advantages, advantages > 0, 0.005, max_response_length=16)
    config = PolicyLossConfig.for_method("care", kl_coef=0.02)
    assert all(fused_region_loss_applies("care", config, mb) for mb in packed)
    results = {name: backends[name].train_step(packed, make_loss_fn(get_policy_loss("care"), config, "care", 0.005,
                                                                     fused=name == "fused"), normalisers)
               for name in ("plain", "fused")}
    assert not results["plain"].skipped and not results["fused"].skipped and results["plain"].loss != 0.0
    assert results["fused"].loss == pytest.approx(results["plain"].loss, rel=1e-5, abs=1e-7)
    assert results["fused"].grad_norm == pytest.approx(results["plain"].grad_norm, rel=1e-4)
    for (name, p), (_, q) in zip(backends["plain"].model.named_parameters(), backends["fused"].model.named_parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name} after the step: {m}")


def test_fused_region_loss_in_a_training_step_equals_unfused_cpu():
    _fused_vs_plain_step("cpu")


@pytest.mark.gpu
def test_fused_region_loss_in_a_training_step_equals_unfused_gpu():
    _fused_vs_plain_step("cuda")
