"""End to end: HF-engine behaviour log-probs against the plain-PyTorch trainer's log-probs of the
same packed sequences (spec section 6 importance ratio): the mismatch metric must be ~0 in fp32."""
import pytest
import torch

from care_megatron.rollout.base import GenerationRequest, SamplingParams
from care_megatron.rollout.hf_engine import HFRolloutEngine
from care_megatron.rollout.mismatch import logprob_temperature, rollout_mismatch
from _rollout_helpers import make_image

registry = pytest.importorskip("care_megatron.models.registry")
prompting = pytest.importorskip("care_megatron.data.prompting")
packing = pytest.importorskip("care_megatron.data.packing")
torch_backend = pytest.importorskip("care_megatron.training.torch_backend")


@pytest.mark.parametrize("arch,temperature", [("qwen2_5_vl", 1.0), ("qwen3_vl", 0.6)])
def test_engine_logprobs_match_trainer_logprobs(arch, temperature):
    from care_megatron.config.schema import ModelConfig

    model, tokenizer, image_processor = registry.build_model_and_processor(
        ModelConfig(name=f"tiny_{arch}", arch=arch), min_pixels=28 * 28, max_pixels=56 * 56)
    prompts = [prompting.build_prompt(q, [make_image(i, 56 - 28 * (i % 2)) for _ in range(n)], tokenizer, image_processor)
               for i, (q, n) in enumerate([("How many shapes?", 1), ("What is 2 + 3?", 0), ("Which bar?", 2)])]
    requests = [GenerationRequest(request_id=str(i), prompt_ids=p.prompt_ids, prompt_text=p.prompt_text, images=p.images,
                                  pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw) for i, p in enumerate(prompts)]
    engine = HFRolloutEngine(model, tokenizer, batch_size=3)
    completions = engine.generate(requests, SamplingParams(temperature=temperature, max_new_tokens=12, seed=1))

    backend = torch_backend.TorchBackend(model, lr=1e-4, temperature=logprob_temperature(temperature), keep_reference=False)
    sequences = [prompting.build_sequence(p, c.token_ids, token_fields={"rollout_logprobs": torch.tensor(c.logprobs)},
                                          sequence_id=i) for i, (p, c) in enumerate(zip(prompts, completions))]
    micro_batches = packing.pack_sequences(sequences, token_budget=4096, mrope=packing.MRopeSpec.from_hf_config(model.config))
    outputs = backend.forward_logprobs(micro_batches)
    for mb, out in zip(micro_batches, outputs):
        value, metrics = rollout_mismatch(out.logprobs, mb.token_fields["rollout_logprobs"], mb.loss_mask)
        assert int(mb.loss_mask.sum()) == sum(len(completions[i].token_ids) for i in mb.sequence_indices.tolist())
        assert metrics["rollout/mismatch_abs_max"] < 2e-5, metrics


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,bound", [("float32", 1e-3), ("bfloat16", 0.1)])
def test_gpu_mismatch_engine_vs_full_forward(dtype, bound, capsys):
    """On a GPU the engine decodes incrementally (batched, left-padded, KV cache) while a trainer
    runs one full forward per sequence: in bf16 they differ by rounding. The mismatch metric
    measures it (printed for the report). Trainer side: the HF model's own forward with M-RoPE."""
    from care_megatron.config.schema import ModelConfig
    from care_megatron.rollout.hf_engine import multimodal_token_types

    model, tokenizer, image_processor = registry.build_model_and_processor(
        ModelConfig(name="tiny_qwen2_5_vl", arch="qwen2_5_vl", dtype=dtype), device="cuda",
        min_pixels=28 * 28, max_pixels=56 * 56)
    model.eval()
    prompts = [prompting.build_prompt("How many shapes?", [make_image(i)], tokenizer, image_processor) for i in range(8)]
    requests = [GenerationRequest(request_id=str(i), prompt_ids=p.prompt_ids, prompt_text=p.prompt_text, images=p.images,
                                  pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw) for i, p in enumerate(prompts)]
    completions = HFRolloutEngine(model, tokenizer, batch_size=8).generate(
        requests, SamplingParams(temperature=1.0, max_new_tokens=32, seed=0))
    train, rollout = [], []
    for p, c in zip(prompts, completions):
        ids = torch.tensor([p.prompt_ids + c.token_ids], device="cuda")
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=p.pixel_values.cuda(),
                           image_grid_thw=p.image_grid_thw.cuda(),
                           mm_token_type_ids=multimodal_token_types(ids, model.config)).logits[0].float()
        start = len(p.prompt_ids)
        lp = torch.log_softmax(logits, -1)[torch.arange(start - 1, ids.shape[1] - 1, device="cuda"), ids[0, start:]]
        train.append(lp.cpu())
        rollout.append(torch.tensor(c.logprobs))
    train, rollout = torch.cat(train), torch.cat(rollout)
    value, metrics = rollout_mismatch(train, rollout, torch.ones_like(train, dtype=torch.bool))
    with capsys.disabled():
        print(f"\n[mismatch {dtype}] tokens={train.numel()} " + " ".join(f"{k}={v:.3g}" for k, v in metrics.items()))
    assert float(value) < bound
