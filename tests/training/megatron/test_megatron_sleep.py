"""Colocated sleep / wake of the Megatron backend, on CPU tensors.

The backend's CPU path skips sleep (no accelerator memory to free), but the offload logic is the
GPU path's own (``host_offload.HostOffloader`` driven by ``MegatronBackend._offload``), run here on
CPU storages: what is copied, what is dropped, what a weight export brings back, and the reuse of
one exactly sized host buffer across cycles. Also: Megatron's schedules scale the loss with the
optimizer's loss scale once ``install_loss_scaling`` wired it (fp16).
"""
import functools
import types

import pytest
import torch

pytest.importorskip("megatron.core")

from care_megatron.training.megatron.host_offload import HostOffloader  # noqa: E402


def _nbytes(t):
    return t.untyped_storage().nbytes()


def test_offloader_copies_kept_drops_gradients_and_reuses_one_buffer():
    weight = torch.randn(6, 4)
    view = weight[1:3]                      # a view: same storage, counted once
    moment = torch.rand(10, dtype=torch.float64)
    grad = torch.randn(6, 4)
    expected_weight, expected_moment = weight.clone(), moment.clone()
    offloader = HostOffloader()
    offloader.offload(keep=[weight, view, moment], drop=[grad, None])
    assert offloader.host.numel() == weight.numel() * 4 + moment.numel() * 8  # exactly the kept bytes
    assert _nbytes(weight) == _nbytes(moment) == _nbytes(grad) == 0
    first_buffer = offloader.host.data_ptr()
    offloader.restore()
    assert torch.equal(weight, expected_weight) and torch.equal(view, expected_weight[1:3])
    assert torch.equal(moment, expected_moment)
    assert torch.equal(grad, torch.zeros(6, 4))  # dropped: zero-filled, not the old values
    assert not offloader.asleep
    weight.add_(1.0)
    offloader.offload(keep=[weight, moment], drop=[grad])  # second cycle: same sizes, same buffer
    assert offloader.host.data_ptr() == first_buffer and offloader.allocations == 1
    offloader.restore()
    assert torch.equal(weight, expected_weight + 1.0)


def test_offloader_partial_restore_then_release_without_copy():
    weight, moment = torch.randn(5), torch.randn(7)
    expected = weight.clone()
    offloader = HostOffloader()
    offloader.offload(keep=[weight, moment])
    offloader.restore([weight])
    assert torch.equal(weight, expected) and _nbytes(moment) == 0 and offloader.asleep
    offloader.release()
    assert _nbytes(weight) == 0
    offloader.restore()
    assert torch.equal(weight, expected) and _nbytes(moment) == 7 * 4
    with pytest.raises(RuntimeError, match="already offloaded"):
        offloader.offload(keep=[weight])
        offloader.offload(keep=[weight])


@pytest.fixture
def cpu_backend(monkeypatch):
    import socket

    from _megatron_fixtures import standard_batches, tiny_hf_model
    from _megatron_workers import loss_fn

    from care_megatron.config.schema import ParallelConfig, TrainConfig
    from care_megatron.training.megatron.backend import MegatronBackend, MegatronBackendOptions
    from care_megatron.training.megatron.parallel_state import destroy_parallel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                           LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    hf = tiny_hf_model(tie=False)
    backend = MegatronBackend(hf.config, hf.state_dict(), parallel=ParallelConfig(backend="megatron", transformer_impl="local"),
                              train=TrainConfig(lr=1e-2, grad_clip=1.0, weight_decay=0.0), dtype=torch.float32,
                              options=MegatronBackendOptions(force_cpu=True, logprob_chunk_tokens=17))
    batches = standard_batches(hf)
    normalisers = {"tokens": float(sum(int(mb.loss_mask.sum()) for mb in batches))}
    backend.train_step(batches, loss_fn, normalisers)  # Adam moments exist; gradients are left in .grad
    try:
        yield backend
    finally:
        destroy_parallel()


def test_backend_sleep_export_wake_cycle(cpu_backend, monkeypatch):
    from care_megatron.training.megatron import weight_export
    from care_megatron.training.megatron.backend import _optimizer_tensors

    backend = cpu_backend
    params = backend._policy_parameters()
    param_storages = {p.untyped_storage()._cdata for p in params}
    # torch AdamW's param_groups hold the parameters themselves; the rest is the optimizer's own state
    moments = [t for t in _optimizer_tensors(backend.optimizer) if t.untyped_storage()._cdata not in param_storages]
    references = [p for ref in backend.reference_chunks for p in ref.parameters()]
    grads = [p.grad for p in params]
    assert moments and references and all(g is not None for g in grads) and any(bool(g.abs().sum()) for g in grads)
    weights_before = [p.detach().clone() for p in params]
    moments_before = [m.clone() for m in moments]
    refs_before = [p.detach().clone() for p in references]
    exported_awake = [(n, t.clone()) for bucket in backend.export_weights() for n, t in bucket]

    kept_storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in [*params, *moments, *references]}
    kept_bytes = sum(kept_storages.values())

    backend._offload()  # the GPU path's sleep, on CPU storages
    assert all(_nbytes(t) == 0 for t in [*params, *moments, *references, *grads])
    assert backend._host_offloader.host.numel() == kept_bytes  # gradients take no host memory

    residency = {}
    real_export = weight_export.export_weights

    def spying_export(owner, bucket_bytes, **options):
        residency["params"] = all(_nbytes(p) > 0 for p in params)
        residency["others"] = [_nbytes(t) for t in [*moments, *references, *grads]]
        yield from real_export(owner, bucket_bytes, **options)

    monkeypatch.setattr(weight_export, "export_weights", spying_export)
    exported_asleep = [(n, t.clone()) for bucket in backend.export_weights() for n, t in bucket]
    assert residency["params"] and not any(residency["others"])  # only the weights came back
    assert [n for n, _ in exported_asleep] == [n for n, _ in exported_awake]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(exported_asleep, exported_awake))
    assert all(_nbytes(p) == 0 for p in params)  # freed again after the export

    buffer = backend._host_offloader.host.data_ptr()
    backend.wake()
    assert all(torch.equal(p, w) for p, w in zip(params, weights_before))
    assert all(torch.equal(m, b) for m, b in zip(moments, moments_before))
    assert all(torch.equal(p, r) for p, r in zip(references, refs_before))
    assert all(not g.any() for g in grads)  # gradients come back zero, not copied
    backend._offload()
    assert backend._host_offloader.host.data_ptr() == buffer and backend._host_offloader.allocations == 1
    backend.wake()
    assert all(torch.equal(p, w) for p, w in zip(params, weights_before))


def test_install_loss_scaling_makes_megatron_backward_scale_the_loss():
    """Megatron's own backward_step multiplies the loss by the optimizer's loss scale once wired
    (MegatronOptimizer.scale_loss = get_loss_scale() * loss, with a dynamic-scaler-like scale)."""
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.optimizer.optimizer import MegatronOptimizer
    from megatron.core.pipeline_parallel.schedules import backward_step

    from care_megatron.training.megatron.backend import install_loss_scaling

    scaler_state = types.SimpleNamespace(get_loss_scale=lambda: torch.tensor([1024.0]))
    optimizer = types.SimpleNamespace(scale_loss=functools.partial(MegatronOptimizer.scale_loss, scaler_state))
    chunk = types.SimpleNamespace(config=ModelParallelConfig())
    install_loss_scaling([chunk], optimizer)
    weight = torch.nn.Parameter(torch.tensor([2.0, -3.0]))
    loss = (weight * torch.tensor([0.5, 0.25])).sum()
    backward_step(None, loss, None, None, chunk.config)
    torch.testing.assert_close(weight.grad, 1024.0 * torch.tensor([0.5, 0.25]))
