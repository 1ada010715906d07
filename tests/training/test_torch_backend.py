"""Plain-PyTorch backend: packed log-probs equal a plain HF forward per sequence; pooling; invariance."""
import copy

import pytest
import torch

from care_megatron.config.schema import ModelConfig
from care_megatron.data.packing import MRopeSpec, pack_sequences
from care_megatron.data.prompting import build_prompt, build_sequence
from care_megatron.data.synthetic import generate
from care_megatron.models import build_model_and_processor
from care_megatron.rewards.regions import Region
from care_megatron.training.torch_backend import TorchBackend


@pytest.fixture(scope="module")
def tiny():
    model, tok, ip = build_model_and_processor(ModelConfig(), min_pixels=56 * 56, max_pixels=56 * 56)
    return model.eval(), tok, ip


def _sequences(tok, ip, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    records = generate("count_shapes", n, seed=seed) 
    seqs = []
    for i, r in enumerate(records):
        images = r.images * (1 + i % 2)  # some sequences carry two images
        prompt = build_prompt(r.question, images, tok, ip)
        length = 5 + i * 3
        response = torch.randint(10, 200, (length,), generator=g)
        regions = torch.randint(0, 3, (length,), generator=g)
        seqs.append(build_sequence(prompt, response, regions, sequence_id=i))
    return seqs


def _reference_logprobs(model, seq, mrope):
    """Plain HF forward of one sequence alone (full logits, log-softmax)."""
    pos = mrope.positions(seq)
    with torch.no_grad():
        out = model(input_ids=seq.input_ids[None], position_ids=pos[:, None, :], pixel_values=seq.pixel_values,
                    image_grid_thw=seq.image_grid_thw, output_hidden_states=True, use_cache=False)
    logp = torch.log_softmax(out.logits[0].float(), -1)[:-1].gather(-1, seq.input_ids[1:, None])[:, 0]
    return torch.cat([torch.zeros(1), logp]), out.hidden_states[-1][0]


def test_packed_logprobs_and_think_embeddings_match_plain_forward(tiny):
    model, tok, ip = tiny
    backend = TorchBackend(copy.deepcopy(model), lr=1e-3, keep_reference=True)
    seqs = _sequences(tok, ip)
    mrope = MRopeSpec.from_hf_config(model.config)
    packed = pack_sequences(seqs, token_budget=max(len(s) for s in seqs) + 8, mrope=mrope, pad_multiple=8)
    assert len(packed) >= 2 and any(mb.num_pad for mb in packed)
    outs = backend.forward_logprobs(packed, with_think_embeddings=True, with_entropy=True)
    for mb, out in zip(packed, outs):
        for k, idx in enumerate(mb.sequence_indices.tolist()):
            a, b = int(mb.cu_seqlens[k]), int(mb.cu_seqlens[k + 1])
            want, hidden = _reference_logprobs(model, seqs[idx], mrope)
            torch.testing.assert_close(out.logprobs[a:b], want, atol=1e-5, rtol=1e-5)
            resp = seqs[idx].loss_mask
            think = resp & (seqs[idx].region_ids == int(Region.THINK))
            sel = think if think.any() else resp
            torch.testing.assert_close(out.think_embeddings[k], hidden[sel].mean(0), atol=1e-5, rtol=1e-5)
        assert torch.all(out.logprobs[int(mb.cu_seqlens[-1]):] == 0)
        assert out.entropy is not None and torch.all(out.entropy[mb.loss_mask] > 0)


def _grads(backend, packed, normaliser):
    backend.optimizer.step = lambda *a, **k: None  # keep the weights; read the summed gradients

    def loss_fn(outputs, mb, normalisers):
        loss = -(outputs.logprobs * mb.loss_mask).sum() / normalisers["n"]
        return loss, {}

    result = backend.train_step(packed, loss_fn, {"n": normaliser})
    return result, {n: p.grad.clone() for n, p in backend.model.named_parameters() if p.grad is not None}


def test_gradients_do_not_depend_on_micro_batching(tiny):
    model, tok, ip = tiny
    seqs = _sequences(tok, ip, n=6, seed=1)
    mrope = MRopeSpec.from_hf_config(model.config)
    n_tok = sum(int(s.loss_mask.sum()) for s in seqs)
    one = pack_sequences(seqs, token_budget=4096, mrope=mrope)
    many = pack_sequences(seqs, token_budget=max(len(s) for s in seqs) + 1, mrope=mrope)
    assert len(one) == 1 and len(many) >= 3
    r1, g1 = _grads(TorchBackend(copy.deepcopy(model), lr=1e-3, keep_reference=False), one, n_tok)
    r2, g2 = _grads(TorchBackend(copy.deepcopy(model), lr=1e-3, keep_reference=False), many, n_tok)
    assert r1.loss == pytest.approx(r2.loss, rel=1e-5)
    assert g1.keys() == g2.keys() and len(g1) > 10
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], atol=1e-6, rtol=1e-4, msg=name)


def test_non_finite_loss_skips_the_step(tiny):
    model, tok, ip = tiny
    backend = TorchBackend(copy.deepcopy(model), lr=1e-2, keep_reference=False)
    packed = pack_sequences(_sequences(tok, ip, n=2), 4096, mrope=MRopeSpec.from_hf_config(model.config))
    before = {n: p.clone() for n, p in backend.model.named_parameters()}
    result = backend.train_step(packed, lambda o, mb, n: (o.logprobs.sum() * float("nan"), {}), {})
    assert result.skipped and backend.steps_taken == 0
    for n, p in backend.model.named_parameters():
        assert torch.equal(p, before[n])


def test_export_weights_buckets_respect_size_and_cover_state_dict(tiny, tmp_path):
    model, _, _ = tiny
    backend = TorchBackend(copy.deepcopy(model), lr=1e-3, keep_reference=False)
    limit = 64 << 10
    buckets = list(backend.export_weights(limit))
    names = [n for b in buckets for n, _ in b]
    # on-disk names, as save_pretrained writes them (what SGLang's loader and the HF engine take)
    from safetensors.torch import load_file
    model.save_pretrained(tmp_path)
    assert sorted(names) == sorted(load_file(str(tmp_path / "model.safetensors")).keys())
    assert len(names) == len(backend.model.state_dict())
    for b in buckets:
        size = sum(t.numel() * t.element_size() for _, t in b)
        assert size <= limit or len(b) == 1


def _all_partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in _all_partitions(rest):
        yield [[first]] + partition
        for k in range(len(partition)):
            yield partition[:k] + [[first] + partition[k]] + partition[k + 1:]


@pytest.mark.parametrize("lengths,overhead", [([10, 10, 10, 40], 5), ([7, 90, 8, 85, 9, 30], 20), ([5, 5, 5], 100),
                                              ([3, 50, 4, 48, 60, 2], 0)])
def test_length_groups_minimise_padded_tokens_plus_overhead(lengths, overhead):
    from care_megatron.training.torch_backend import length_groups

    def cost(groups):
        return sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)

    groups = length_groups(lengths, overhead)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(g == sorted(g) for g in groups)
    assert cost(groups) == min(cost(p) for p in _all_partitions(list(range(len(lengths)))))
    if lengths == [10, 10, 10, 40]:
        assert groups == [[0, 1, 2], [3]]  # 3 x 10 + 1 x 40 + 2 x 5 = 80 < 4 x 40 + 5


def test_grouped_forward_matches_one_padded_batch(tiny):
    """group_by_length: sequences of very different lengths (one and two images each) run in separate
    padded batches with their own images; log-probs, entropies, think embeddings and gradients equal
    the single padded batch's (floating-point summation order aside) and the plain HF forward's."""
    from care_megatron.training.torch_backend import length_groups

    model, tok, ip = tiny
    g = torch.Generator().manual_seed(3)
    seqs = []
    for i, r in enumerate(generate("count_shapes", 6, seed=4)):
        prompt = build_prompt(r.question, r.images * (1 + i % 2), tok, ip)
        length = 90 if i in (1, 4) else 4 + i  # two long responses (as RGR's reflections are)
        seqs.append(build_sequence(prompt, torch.randint(10, 200, (length,), generator=g),
                                   torch.randint(0, 3, (length,), generator=g), sequence_id=i))
    mrope = MRopeSpec.from_hf_config(model.config)
    packed = pack_sequences(seqs, token_budget=4096, mrope=mrope, pad_multiple=8)
    assert len(packed) == 1
    groups = length_groups(packed[0].sequence_lengths().tolist())
    assert len(groups) >= 2 and any(len(grp) == 2 for grp in groups)
    grouped = TorchBackend(copy.deepcopy(model), lr=1e-3, keep_reference=False, group_by_length=True)
    single = TorchBackend(copy.deepcopy(model), lr=1e-3, keep_reference=False, group_by_length=False)
    a = grouped.forward_logprobs(packed, with_think_embeddings=True, with_entropy=True)[0]
    b = single.forward_logprobs(packed, with_think_embeddings=True, with_entropy=True)[0]
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.entropy, b.entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.think_embeddings, b.think_embeddings, atol=1e-5, rtol=1e-5)
    mb = packed[0]
    for k, idx in enumerate(mb.sequence_indices.tolist()):
        want, _ = _reference_logprobs(model, seqs[idx], mrope)
        torch.testing.assert_close(a.logprobs[int(mb.cu_seqlens[k]):int(mb.cu_seqlens[k + 1])], want, atol=1e-5, rtol=1e-5)
    n_tok = sum(int(s.loss_mask.sum()) for s in seqs)
    r1, g1 = _grads(grouped, packed, n_tok)
    r2, g2 = _grads(single, packed, n_tok)
    assert r1.loss == pytest.approx(r2.loss, rel=1e-5) and len(g1) > 10
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], atol=1e-6, rtol=1e-4, msg=name)
