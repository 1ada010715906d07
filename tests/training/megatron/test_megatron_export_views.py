"""MegatronBackend.export_weights(views=True), the form colocate.sync_weights asks for: the same HF
tensors bit for bit as the copying default, and an engine synced from them keeps its weights when
the trainer's parameters move on."""
import copy

import pytest
import torch

pytest.importorskip("megatron.core")

from test_megatron_sleep import cpu_backend  # noqa: E402,F401  (the fixture: a CPU MegatronBackend after one step)


def test_views_export_matches_copies_and_sync_survives_the_next_step(cpu_backend):
    from _megatron_fixtures import standard_batches, tiny_hf_model
    from _megatron_workers import loss_fn

    from care_megatron.rollout.colocate import sync_weights
    from care_megatron.rollout.hf_engine import HFRolloutEngine, checkpoint_name_to_module_name

    backend = cpu_backend
    params = backend._policy_parameters()
    copies = [(n, t) for bucket in backend.export_weights(1 << 16) for n, t in bucket]
    viewed = [(n, t.clone()) for bucket in backend.export_weights(1 << 16, views=True) for n, t in bucket]
    assert [n for n, _ in viewed] == [n for n, _ in copies]
    assert all(a.dtype == b.dtype and torch.equal(a, b) for (_, a), (_, b) in zip(viewed, copies))
    storages = {p.untyped_storage().data_ptr() for p in params}
    # the default never aliases a parameter; views=True does wherever the layout allows
    assert not any(t.untyped_storage().data_ptr() in storages for _, t in copies)
    assert any(t.untyped_storage().data_ptr() in storages
               for bucket in backend.export_weights(1 << 16, views=True) for _, t in bucket)

    hf = tiny_hf_model(tie=False)
    rollout = copy.deepcopy(hf).eval()
    with torch.no_grad():
        for p in rollout.parameters():
            p.zero_()
    engine = HFRolloutEngine(rollout, tokenizer=None, stop_token_ids=[0], pad_token_id=0)
    sync_weights(backend, engine, bucket_bytes=1 << 16)
    state = rollout.state_dict()
    for name, tensor in copies:
        assert torch.equal(state[checkpoint_name_to_module_name(name, state)], tensor), name
    synced = {n: t.clone() for n, t in state.items()}

    batches = standard_batches(hf)
    normalisers = {"tokens": float(sum(int(mb.loss_mask.sum()) for mb in batches))}
    before = [p.detach().clone() for p in params]
    backend.train_step(batches, loss_fn, normalisers)  # lr 1e-2: every parameter with a gradient moves
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    assert all(torch.equal(rollout.state_dict()[n], t) for n, t in synced.items())
