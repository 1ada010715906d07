"""Worker bodies of the distributed Megatron tests (run under torch.multiprocessing spawn, gloo, CPU).

Each worker builds the tiny HF Qwen2.5-VL (same seed in every process), a MegatronBackend at the
requested TP from the same weights, and writes what it measured to ``out_dir`` for the test to assert.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from _megatron_fixtures import hf_reference, standard_batches, tiny_hf_model

LR = 1e-2


def loss_fn(outputs, mb, normalisers):
    """Region-weighted log-prob objective + entropy bonus, divided by the global token count."""
    mask = mb.loss_mask.float()
    weight = torch.linspace(-1.0, 1.0, mb.num_tokens, device=outputs.logprobs.device)
    loss = -(outputs.logprobs * weight * mask).sum() / normalisers["tokens"]
    if outputs.entropy is not None:
        loss = loss - 0.05 * (outputs.entropy * mask).sum() / normalisers["tokens"]
    return loss, {"masked_tokens": float(mask.sum())}


def hf_loss_and_grads(hf, batches, normalisers):
    hf.zero_grad()
    total = 0.0
    for mb in batches:
        lp, ent, _ = hf_reference_with_grad(hf, mb)
        outputs = type("O", (), {"logprobs": lp, "entropy": ent})
        loss, _ = loss_fn(outputs, mb, normalisers)
        loss.backward()
        total += float(loss.detach())
    return total, {n: p.grad.clone() for n, p in hf.named_parameters() if p.grad is not None}


def hf_reference_with_grad(hf, mb):
    with torch.enable_grad():
        return hf_reference(hf, mb)


def MegatronBackend_from_run_config(cfg, hf):
    from care_megatron.training.megatron.backend import MegatronBackend

    return MegatronBackend.from_run_config(cfg, hf, keep_reference=False)


def _setup(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import _collective_guard

    _collective_guard.install()  # a host tensor on a would-be-NCCL group fails the test


def _backend(hf, tp, sp=False):
    from care_megatron.config.schema import ParallelConfig, TrainConfig
    from care_megatron.training.megatron.backend import MegatronBackend, MegatronBackendOptions

    parallel = ParallelConfig(backend="megatron", tensor_model_parallel_size=tp, sequence_parallel=sp,
                              transformer_impl="local")
    train = TrainConfig(lr=LR, grad_clip=1.0, weight_decay=0.0)
    return MegatronBackend(hf.config, hf.state_dict(), parallel=parallel, train=train, dtype=torch.float32,
                           options=MegatronBackendOptions(force_cpu=True, logprob_chunk_tokens=17))


def parity_worker(rank, world, port, tp, out_dir, ckpt_dir, load_dir, sp=False):
    """Forward / gradient / optimizer-step parity vs transformers, then checkpoint save or load."""
    _setup(rank, world, port)
    hf = tiny_hf_model(tie=False)
    batches = standard_batches(hf)
    backend = _backend(hf, tp, sp)
    from care_megatron.training.base import TrainingBackend

    assert isinstance(backend, TrainingBackend)
    result = {}
    # 1. forward parity (policy and reference), entropy, think embeddings
    outs = backend.forward_logprobs(batches, with_entropy=True, with_think_embeddings=True)
    refs = backend.forward_logprobs(batches, model="reference")
    with torch.no_grad():
        expected = [hf_reference(hf, mb) for mb in batches]
    result["lp_err"] = max(float((o.logprobs - e[0]).abs().max()) for o, e in zip(outs, expected))
    result["ent_err"] = max(float((o.entropy - e[1]).abs().max()) for o, e in zip(outs, expected))
    result["think_err"] = max(float((o.think_embeddings - e[2]).abs().max()) for o, e in zip(outs, expected))
    result["ref_err"] = max(float((o.logprobs - r.logprobs).abs().max()) for o, r in zip(outs, refs))
    result["lp_scale"] = float(expected[0][0].abs().mean())
    # 1b. weight export (weight_export.py through the shared mapping) returns the HF weights exactly
    from care_megatron.models.weight_mapping import mapping_for_config as _mapping

    canonical = {_mapping(hf.config).canonical_hf_name(n): t for n, t in hf.state_dict().items()}
    exported = {_mapping(hf.config).canonical_hf_name(n): t for bucket in backend.export_weights() for n, t in bucket}
    result["export_exact"] = set(exported) == set(canonical) and all(torch.equal(exported[n], canonical[n])
                                                                      for n in canonical)
    # 2. gradient parity: megatron grads (before the optimizer) vs HF grads, in HF names
    normalisers = {"tokens": float(sum(int(mb.loss_mask.sum()) for mb in batches))}
    from care_megatron.training.megatron.packed_forward import ForwardOptions

    backend.optimizer.zero_grad()
    backend._cpu_forward_backward(batches, loss_fn, normalisers, ForwardOptions(with_entropy=True, logprob_chunk_tokens=17))
    hf_loss, hf_grads = hf_loss_and_grads(hf, batches, normalisers)
    parity = grad_parity(backend, hf, hf_grads)
    assert not parity["missing_grads"], parity["missing_grads"]
    result["grad_err"], result["grad_scale"] = parity["grad_err"], parity["grad_scale"]
    # 3. one optimizer step parity: MegatronBackend.train_step vs HF + AdamW with the same clip
    step = backend.train_step(batches, loss_fn, normalisers)
    hf_loss, _ = hf_loss_and_grads(hf, batches, normalisers)
    hf_norm = float(torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0))
    torch.optim.AdamW(hf.parameters(), lr=LR, weight_decay=0.0).step()
    result["loss_err"] = abs(step.loss - hf_loss)
    result["norm_err"] = abs(step.grad_norm - hf_norm)
    result["grad_norm"] = step.grad_norm
    after = backend.forward_logprobs(batches)
    with torch.no_grad():
        expected_after = [hf_reference(hf, mb)[0] for mb in batches]
    result["step_lp_err"] = max(float((o.logprobs - e).abs().max()) for o, e in zip(after, expected_after))
    result["step_lp_change"] = max(float((o.logprobs - e[0]).abs().max()) for o, e in zip(after, expected))
    # 4. checkpoint: save here, or load one written at another TP and compare log-probs
    if ckpt_dir:
        backend.save_checkpoint(ckpt_dir)
        if rank == 0:
            torch.save([o.logprobs for o in after], os.path.join(out_dir, "after_step_logprobs.pt"))
    if load_dir:
        fresh = _backend(tiny_hf_model(tie=False, seed=123), tp)  # different weights, then load
        fresh.load_checkpoint(load_dir)
        loaded = fresh.forward_logprobs(batches)
        saved = torch.load(os.path.join(out_dir, "after_step_logprobs.pt"))
        result["ckpt_err"] = max(float((o.logprobs - s).abs().max()) for o, s in zip(loaded, saved))
    # 5. cross-backend: MegatronBackend.from_run_config vs the plain-PyTorch backend, temperature 0.7
    if tp == 1 and not sp:
        from care_megatron.config.schema import ParallelConfig, RolloutConfig, RunConfig
        from care_megatron.training.torch_backend import TorchBackend

        hf_fresh = tiny_hf_model(tie=False)
        cfg = RunConfig(parallel=ParallelConfig(backend="megatron", transformer_impl="local"),
                        rollout=RolloutConfig(temperature=0.7))
        mg = MegatronBackend_from_run_config(cfg, hf_fresh)
        tb = TorchBackend(hf_fresh, lr=1e-3, temperature=0.7, keep_reference=False)
        a = mg.forward_logprobs(batches, with_entropy=True, with_think_embeddings=True)
        b = tb.forward_logprobs(batches, with_entropy=True, with_think_embeddings=True)
        result["torch_backend_lp_err"] = max(float((x.logprobs - y.logprobs).abs().max()) for x, y in zip(a, b))
        result["torch_backend_ent_err"] = max(float((x.entropy - y.entropy).abs().max()) for x, y in zip(a, b))
        result["torch_backend_think_err"] = max(float((x.think_embeddings - y.think_embeddings).abs().max())
                                                for x, y in zip(a, b))
    # 6. sleep / wake round trip keeps weights and optimizer state bit-exact
    # (CPU path: sleep is a no-op, there is no accelerator memory; the GPU offload is exercised here
    # by calling the storage offload directly, as sleep() does on GPU, with a checkpoint save in between)
    before = {n: p.detach().clone() for n, p in backend.policy.named_parameters()}
    backend.sleep()
    result["cpu_sleep_noop"] = all(p.untyped_storage().nbytes() > 0 for p in backend.policy.parameters())
    backend._offload()  # what sleep() does on GPU: weights, grads, optimizer state to host
    result["sleep_freed"] = all(p.untyped_storage().nbytes() == 0 for p in backend.policy.parameters())
    backend.save_checkpoint(os.path.join(out_dir, f"asleep_tp{tp}{'_sp' if sp else ''}"))  # wakes, saves, re-offloads
    result["still_asleep"] = all(p.untyped_storage().nbytes() == 0 for p in backend.policy.parameters())
    backend.wake()
    result["wake_exact"] = all(torch.equal(before[n], p) for n, p in backend.policy.named_parameters())
    if rank == 0:
        torch.save(result, os.path.join(out_dir, f"result_tp{tp}{'_sp' if sp else ''}.pt"))
    from care_megatron.training.megatron.parallel_state import destroy_parallel

    destroy_parallel()


def gpu_bf16_worker(rank, world, port, out_dir):
    """GPU: MegatronBackend (DDP + Megatron optimizer path) in bf16 vs transformers bf16 and fp32."""
    _setup(rank, world, port)
    from care_megatron.config.schema import ParallelConfig, TrainConfig
    from care_megatron.training.megatron.backend import MegatronBackend, MegatronBackendOptions

    hf32 = tiny_hf_model(tie=False)
    batches = standard_batches(hf32)
    with torch.no_grad():
        exact = [hf_reference(hf32, mb) for mb in batches]
    hf16 = tiny_hf_model(tie=False).to(torch.bfloat16)
    with torch.no_grad():
        hf_bf16 = [hf_reference(hf16, mb) for mb in batches]
    parallel = ParallelConfig(backend="megatron", transformer_impl="local")
    backend = MegatronBackend(hf32.config, hf32.state_dict(), parallel=parallel, train=TrainConfig(lr=1e-3),
                              dtype=torch.bfloat16, options=MegatronBackendOptions(logprob_chunk_tokens=32))
    outs = backend.forward_logprobs(batches, with_entropy=True, with_think_embeddings=True)
    result = {
        "megatron_err": max(float((o.logprobs - e[0]).abs().max()) for o, e in zip(outs, exact)),
        "hf_bf16_err": max(float((h[0] - e[0]).abs().max()) for h, e in zip(hf_bf16, exact)),
        "megatron_mean_err": sum(float((o.logprobs - e[0]).abs().mean()) for o, e in zip(outs, exact)) / len(outs),
        "hf_bf16_mean_err": sum(float((h[0] - e[0]).abs().mean()) for h, e in zip(hf_bf16, exact)) / len(outs),
        "entropy_err": max(float((o.entropy - e[1]).abs().max()) for o, e in zip(outs, exact)),
        "cpu_path": backend.cpu_path,
        "optimizer": backend.optimizer.name,
    }
    normalisers = {"tokens": float(sum(int(mb.loss_mask.sum()) for mb in batches))}
    from care_megatron.training.update_norm import snapshot_parameters

    # update/param_norm on CUDA parameters: the snapshot's distance against the exported weights' change
    snapshot = snapshot_parameters(backend)
    exported_before = {n: t.detach().double().cpu() for bucket in backend.export_weights() for n, t in bucket}
    steps = [backend.train_step(batches, loss_fn, normalisers) for _ in range(3)]
    result["update_norm"] = snapshot.distance()
    result["exported_update_norm"] = sum(float((t.detach().double().cpu() - exported_before[n]).square().sum())
                                         for bucket in backend.export_weights() for n, t in bucket) ** 0.5
    hf_loss, _ = hf_loss_and_grads(hf32, batches, normalisers)
    result["first_loss_err"] = abs(steps[0].loss - hf_loss)
    result["losses"] = [s.loss for s in steps]
    result["grad_norms"] = [s.grad_norm for s in steps]
    result["skipped"] = [s.skipped for s in steps]
    torch.save(result, os.path.join(out_dir, "gpu_result.pt"))
    from care_megatron.training.megatron.parallel_state import destroy_parallel

    destroy_parallel()


def grad_parity(backend, hf, hf_grads) -> dict:
    """Every model-parallel rank's gradient shards (all chunks) -> HF names through the shared
    mapping's inverse, compared with transformers' gradients (call on every rank: collective)."""
    from care_megatron.models.weight_mapping import mapping_for_config, megatron_to_hf_state_dict
    from megatron.core import parallel_state as mps

    from care_megatron.training.megatron.model_provider import to_mapping_name

    vp = backend.vp_size
    local = [{to_mapping_name(n): p.grad.detach().clone() for n, p in chunk.named_parameters()}
             for chunk in backend.policy_chunks]
    gathered = [None] * (backend.dist["tp_size"] * backend.dist["pp_size"])
    dist.all_gather_object(gathered, (backend.dist["pp_rank"], backend.dist["tp_rank"], local),
                           group=mps.get_model_parallel_group())
    shards = {(p, t, v) if vp else (p, t): g[v] for p, t, g in gathered for v in range(vp or 1)}
    mg_grads = megatron_to_hf_state_dict(shards, hf.config)
    spec = mapping_for_config(hf.config)
    hf_grads = {spec.canonical_hf_name(n): g for n, g in hf_grads.items()}
    common = set(mg_grads) & set(hf_grads)

    def scale(names):
        return max((float(hf_grads[n].abs().max()) for n in names), default=0.0)

    # The replicated vision tower is not reduced over TP: every TP rank's copy must already hold the
    # full gradient (the mapping above reads one rank's copy; compare the others with it).
    first_copy: dict = {}
    vision_tp_spread = 0.0
    for p, _, chunks in gathered:
        for v, chunk in enumerate(chunks):
            for name, grad in chunk.items():
                if name.startswith("vision_model."):
                    ref = first_copy.setdefault((p, v, name), grad)
                    vision_tp_spread = max(vision_tp_spread, float((grad - ref).abs().max()))
    return {
        "_megatron_grads": mg_grads,  # HF names; popped by the caller (not a result)
        "missing_grads": sorted(set(hf_grads) ^ set(mg_grads)),
        # the largest error against transformers, including every TP rank's vision-tower copy
        "grad_err": max(max(float((mg_grads[n] - hf_grads[n]).abs().max()) for n in common), vision_tp_spread),
        "vision_grad_tp_spread": vision_tp_spread,
        "grad_scale": scale(common),
        "vision_grad_scale": scale([n for n in common if n.startswith(("visual.", "model.visual."))]),
        "deepstack_grad_scale": scale([n for n in common if "deepstack" in n]),
    }


def _hf_step_with_gradients(hf, grads_by_name: dict):
    """A copy of ``hf`` after the test's AdamW step (clip 1.0) taken with ``grads_by_name`` (canonical
    HF names) instead of its own gradients."""
    import copy

    from care_megatron.models.weight_mapping import mapping_for_config

    spec = mapping_for_config(hf.config)
    twin = copy.deepcopy(hf)
    for name, p in twin.named_parameters():
        p.grad = grads_by_name[spec.canonical_hf_name(name)].to(p.dtype).clone()
    torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
    torch.optim.AdamW(twin.parameters(), lr=LR, weight_decay=0.0).step()
    return twin


def _step_drift(backend, hf, hf_grads) -> dict:
    """Where the weights after one AdamW step differ from transformers' (call on every rank).

    AdamW's first step moves each weight by lr * g / (|g| + eps): about lr * sign(g) wherever |g| >> eps,
    so a gradient entry that is rounding noise in both implementations (an analytically ~zero entry)
    can move by up to lr in opposite directions. ``step_param_err_large_grad`` is the error on the
    entries whose gradient is well above rounding (|g| > 1e-6 * max |g| of the tensor)."""
    from care_megatron.models.weight_mapping import mapping_for_config

    spec = mapping_for_config(hf.config)
    mine = {spec.canonical_hf_name(n): t for bucket in backend.export_weights() for n, t in bucket}
    theirs = {spec.canonical_hf_name(n): p.detach() for n, p in hf.named_parameters()}
    grads = {spec.canonical_hf_name(n): g for n, g in hf_grads.items()}
    worst, worst_name, worst_grad, large_err = 0.0, "", 0.0, 0.0
    for name, t in mine.items():
        if name not in theirs or name not in grads:
            continue
        err = (t - theirs[name]).abs()
        g = grads[name].abs()
        index = int(err.argmax())
        if float(err.view(-1)[index]) > worst:
            worst, worst_name, worst_grad = float(err.view(-1)[index]), name, float(g.view(-1)[index])
        large = g > 1e-6 * float(g.max()) if float(g.max()) > 0 else torch.zeros_like(g, dtype=torch.bool)
        if large.any():
            large_err = max(large_err, float(err[large].max()))
    return {"step_param_err": worst, "step_param_err_name": worst_name, "step_param_err_grad": worst_grad,
            "step_param_err_large_grad": large_err}


def _export_equal(backend, hf) -> bool:
    """export_weights (every chunk, TP all-gather, PP broadcast) returns transformers' weights exactly."""
    from care_megatron.models.weight_mapping import mapping_for_config

    spec = mapping_for_config(hf.config)
    canonical = {spec.canonical_hf_name(n): t for n, t in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:  # tied: exported once, as save_pretrained writes it
        canonical.pop("lm_head.weight", None)
    exported = {spec.canonical_hf_name(n): t for bucket in backend.export_weights() for n, t in bucket}
    return set(exported) == set(canonical) and all(torch.equal(exported[n], canonical[n]) for n in canonical)


def model_parallel_worker(rank, world, port, out_dir, tp, cp, sp, arch, pp=1, tie=False, vp=None, recompute=None):
    """TP=tp x CP=cp x PP=pp (optional SP, DP = world / (tp * cp * pp)) vs transformers:
    forward outputs, gradients of the step's objective (summed over DP x CP), one AdamW step; the
    flex attention vs the loop one. DP rank d trains on micro-batches d, d + DP, ...; transformers
    on all of them. Under PP the micro-batches run through Megatron's own schedules (p2p over gloo)."""
    _setup(rank, world, port)
    from megatron.core import parallel_state as mps

    from care_megatron.config.schema import ParallelConfig, TrainConfig
    from care_megatron.training.megatron.attention import force_packed_backend
    from care_megatron.training.megatron.backend import MegatronBackend, MegatronBackendOptions
    from care_megatron.training.megatron.packed_forward import ForwardOptions

    layers = 2 * pp * vp if vp else None
    hf = tiny_hf_model(arch=arch) if arch != "qwen2_5_vl" else tiny_hf_model(tie=tie, layers=layers)
    # under PP the micro-batches keep their own lengths (the schedules exchange shapes, or pad to one)
    pad_to = None if pp > 1 and not sp else 96
    all_batches = standard_batches(hf, pad_to=pad_to)
    if vp:  # 3 micro-batches: the interleaved schedule needs a multiple of PP, so one empty one is added
        all_batches = all_batches + standard_batches(hf, seed=2, pad_to=pad_to)[:1]
    parallel = ParallelConfig(backend="megatron", tensor_model_parallel_size=tp, context_parallel_size=cp,
                              pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vp,
                              sequence_parallel=sp, transformer_impl="local", recompute=recompute)
    backend = MegatronBackend(hf.config, hf.state_dict(), parallel=parallel, train=TrainConfig(lr=LR, grad_clip=1.0),
                              arch=arch, options=MegatronBackendOptions(force_cpu=True, logprob_chunk_tokens=17),
                              with_reference=pp > 1)
    batches = all_batches[backend.dist["dp_rank"]::backend.dist["dp_size"]]
    outs = backend.forward_logprobs(batches, with_entropy=True, with_think_embeddings=True)
    lengths = sorted({mb.num_tokens for mb in batches})
    with torch.no_grad():
        expected = [hf_reference(hf, mb) for mb in batches]
    result = {
        "cp_size": backend.dist["cp_size"], "dp_size": backend.dist["dp_size"],
        "lp_err": max(float((o.logprobs - e[0]).abs().max()) for o, e in zip(outs, expected)),
        "ent_err": max(float((o.entropy - e[1]).abs().max()) for o, e in zip(outs, expected)),
        "think_err": max(float((o.think_embeddings - e[2]).abs().max()) for o, e in zip(outs, expected)),
        "lp_scale": float(expected[0][0].abs().mean()),
        "distinct_lengths": len(lengths),
    }
    if backend.reference is not None:  # the frozen reference through the same schedules
        refs = backend.forward_logprobs(batches, model="reference")
        result["ref_err"] = max(float((o.logprobs - r.logprobs).abs().max()) for o, r in zip(outs, refs))
    result["exported_equal"] = _export_equal(backend, hf)  # before any step: exactly the HF weights
    with force_packed_backend("flex"):
        flex = backend.forward_logprobs(batches)
    result["flex_vs_loop"] = max(float((f.logprobs - o.logprobs).abs().max()) for f, o in zip(flex, outs))
    normalisers = {"tokens": float(sum(int(mb.loss_mask.sum()) for mb in all_batches))}
    backend.optimizer.zero_grad()
    options = ForwardOptions(with_entropy=True, logprob_chunk_tokens=17)
    layer = backend.policy.language_model.decoder.layers[0]
    counts = {"mlp": 0, "core_attention": 0}
    hooks = [module.register_forward_hook(lambda *_, key=key: counts.__setitem__(key, counts[key] + 1))
             for key, module in (("mlp", layer.mlp), ("core_attention", layer.self_attention.core_attention))]
    if pp > 1:
        backend._schedule_forward_backward(batches, loss_fn, normalisers, options)
    else:
        backend._cpu_forward_backward(batches, loss_fn, normalisers, options)
    for hook in hooks:
        hook.remove()
    result["forwards_per_micro_batch"] = {k: v / len(batches) for k, v in counts.items()}
    _, hf_grads = hf_loss_and_grads(hf, all_batches, normalisers)
    result.update(grad_parity(backend, hf, hf_grads))
    megatron_grads = result.pop("_megatron_grads")
    # one optimizer step vs transformers + AdamW with the same clip
    step = backend.train_step(batches, loss_fn, normalisers)
    hf_loss, _ = hf_loss_and_grads(hf, all_batches, normalisers)
    same_grads = _hf_step_with_gradients(hf, megatron_grads)  # before hf's own step changes its weights
    hf_norm = float(torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0))
    torch.optim.AdamW(hf.parameters(), lr=LR, weight_decay=0.0).step()
    result["loss_err"] = abs(step.loss - hf_loss)   # the step's loss is summed over DP
    result["norm_err"] = abs(step.grad_norm - hf_norm)
    result["masked_tokens"] = step.metrics["masked_tokens"]   # metrics summed over DP ...
    result["expected_masked_tokens"] = normalisers["tokens"]  # ... = every micro-batch's count
    after = backend.forward_logprobs(batches)
    with torch.no_grad():
        expected_after = [hf_reference(hf, mb)[0] for mb in batches]
    result["step_lp_err"] = max(float((o.logprobs - e).abs().max()) for o, e in zip(after, expected_after))
    result["step_lp_change"] = max(float((o.logprobs - e[0]).abs().max()) for o, e in zip(after, expected))
    result.update(_step_drift(backend, hf, hf_grads))
    with torch.no_grad():  # the same AdamW step from Megatron's own gradients: isolates the optimizer step
        expected_same = [hf_reference(same_grads, mb)[0] for mb in batches]
    result["step_lp_err_same_grads"] = max(float((o.logprobs - e).abs().max()) for o, e in zip(after, expected_same))
    if tie and pp > 1:  # the first stage's embedding and the last stage's copy stay one weight
        holder = [c for c in backend.policy_chunks if c.pre_process or c.post_process]
        mine = holder[0].shared_embedding_or_output_weight().detach().clone() if holder else None
        copies = [None] * pp
        dist.all_gather_object(copies, mine, group=mps.get_pipeline_model_parallel_group())
        result["tied_copies_equal"] = torch.equal(copies[0], copies[-1])
    if vp:  # a checkpoint written with virtual stages reloads into a fresh backend of the same layout
        ckpt_dir = os.path.join(out_dir, "vp_ckpt")
        backend.save_checkpoint(ckpt_dir)
        fresh = MegatronBackend(hf.config, tiny_hf_model(tie=tie, layers=layers, seed=123).state_dict(), parallel=parallel,
                                train=TrainConfig(lr=LR), arch=arch,
                                options=MegatronBackendOptions(force_cpu=True, logprob_chunk_tokens=17),
                                with_reference=False)
        fresh.load_checkpoint(ckpt_dir)
        reloaded = fresh.forward_logprobs(batches)
        result["ckpt_err"] = max(float((r.logprobs - o.logprobs).abs().max()) for r, o in zip(reloaded, after))
        if rank == 0:  # for a reload at another layout (reshard_worker)
            torch.save([o.logprobs for o in after], os.path.join(out_dir, "vp_ckpt_logprobs.pt"))

    results = [None] * world
    dist.all_gather_object(results, result)
    if rank == 0:
        torch.save(results, os.path.join(out_dir, f"cp{cp}_tp{tp}_pp{pp}{'_sp' if sp else ''}_{arch}{recompute or ''}.pt"))
    from care_megatron.training.megatron.parallel_state import destroy_parallel

    destroy_parallel()


def reshard_worker(rank, world, port, out_dir, ckpt_dir, layers, tie, tp, pp):
    """Load a distributed checkpoint written at another TP / PP / VP layout into a fresh backend
    (different initial weights) and compare its log-probs with the ones saved at write time."""
    _setup(rank, world, port)
    from care_megatron.config.schema import ParallelConfig, TrainConfig
    from care_megatron.training.megatron.backend import MegatronBackend, MegatronBackendOptions

    hf = tiny_hf_model(tie=tie, layers=layers)
    batches = standard_batches(hf, pad_to=None) + standard_batches(hf, seed=2, pad_to=None)[:1]  # as written
    parallel = ParallelConfig(backend="megatron", tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              transformer_impl="local")
    fresh = MegatronBackend(hf.config, tiny_hf_model(tie=tie, layers=layers, seed=123).state_dict(), parallel=parallel,
                            train=TrainConfig(lr=LR), options=MegatronBackendOptions(force_cpu=True), with_reference=False)
    before = fresh.forward_logprobs(batches)
    fresh.load_checkpoint(ckpt_dir)
    loaded = fresh.forward_logprobs(batches)
    saved = torch.load(os.path.join(out_dir, "vp_ckpt_logprobs.pt"))
    result = {"reshard_err": max(float((o.logprobs - s).abs().max()) for o, s in zip(loaded, saved)),
              "moved": max(float((o.logprobs - b.logprobs).abs().max()) for o, b in zip(loaded, before))}
    if rank == 0:
        torch.save(result, os.path.join(out_dir, f"reshard_tp{tp}_pp{pp}.pt"))
    from care_megatron.training.megatron.parallel_state import destroy_parallel

    destroy_parallel()


def _exported_like_parameters(backend, state_key: str | None) -> dict:
    """HF-named full tensors of the parameters (``state_key`` None) or of one AdamW state tensor laid
    out like them (``exp_avg`` / ``exp_avg_sq``), through the weight export (TP shards gathered)."""
    inner = backend.optimizer.optimizer
    swapped = []
    if state_key is not None:
        for p in backend.optimizer.params:
            swapped.append((p, p.data))
            p.data = inner.state[p][state_key]
    try:
        return {n: t.detach().clone() for bucket in backend.export_weights() for n, t in bucket}
    finally:
        for p, data in swapped:
            p.data = data


def resume_worker(rank, world, port, out_dir, tp, ckpt_dir, mode):
    """``save``: step 1, checkpoint, step 2 (the uninterrupted run). ``load``: a backend built from other
    weights loads the checkpoint and takes step 2; ``weights_only`` does the same after loading the
    weights alone (what the old resume did at another layout: optimizer state reset). Records the
    AdamW moments before step 2 and the weights after it, as full HF-named tensors."""
    _setup(rank, world, port)
    hf = tiny_hf_model(tie=False)
    batches = standard_batches(hf)
    normalisers = {"tokens": float(sum(int(mb.loss_mask.sum()) for mb in batches))}
    if mode == "save":
        backend = _backend(hf, tp)
        backend.train_step(batches, loss_fn, normalisers)
        backend.save_checkpoint(ckpt_dir)
    else:
        backend = _backend(tiny_hf_model(tie=False, seed=123), tp)
        if mode == "load":
            backend.load_checkpoint(ckpt_dir)
        else:
            from care_megatron.training.megatron import checkpoint as ckpt

            ckpt.load_model(backend.policy_chunks, f"{ckpt_dir}/model")
            backend.step_count = 1
            backend.optimizer._ensure_state()  # zero moments, step 0: a fresh AdamW
    result = {"step_count": backend.step_count,
              "exp_avg": _exported_like_parameters(backend, "exp_avg"),
              "exp_avg_sq": _exported_like_parameters(backend, "exp_avg_sq"),
              "adam_step": {float(s["step"]) for s in backend.optimizer.optimizer.state.values()}}
    backend.train_step(batches, loss_fn, normalisers)
    result["weights_after"] = _exported_like_parameters(backend, None)
    if rank == 0:
        torch.save(result, os.path.join(out_dir, f"resume_{mode}_tp{tp}.pt"))
    from care_megatron.training.megatron.parallel_state import destroy_parallel

    destroy_parallel()


def _backend_at_lr(hf, lr):
    """A TP=1 CPU backend like ``_backend``, at learning rate ``lr``."""
    from care_megatron.config.schema import ParallelConfig, TrainConfig
    from care_megatron.training.megatron.backend import MegatronBackend, MegatronBackendOptions

    parallel = ParallelConfig(backend="megatron", transformer_impl="local")
    return MegatronBackend(hf.config, hf.state_dict(), parallel=parallel, train=TrainConfig(lr=lr, grad_clip=1.0),
                           dtype=torch.float32, options=MegatronBackendOptions(force_cpu=True, logprob_chunk_tokens=17),
                           with_reference=False)


def release_019_checkpoint_worker(rank, world, port, out_dir, ckpt_dir, lr_saved, lr_resumed):
    """A checkpoint written the way megatron-core 0.19 writes it (``_megatron_release_019``), read by
    the installed 0.16.1, and resumed under another ``train.lr``.

    ``straight``: step 1 at ``lr_saved``, checkpoint, step 2 at ``lr_resumed``. ``resumed``: a backend
    built at ``lr_resumed`` from other weights loads the checkpoint and takes step 2. Then the
    checkpoint's ``common.pt`` is removed and the load is tried again (the refusal)."""
    import dataclasses

    from care_megatron.training.megatron.parallel_state import destroy_parallel

    import _megatron_release_019 as release_019

    _setup(rank, world, port)
    hf = tiny_hf_model(tie=False)
    batches = standard_batches(hf)
    normalisers = {"tokens": float(sum(int(mb.loss_mask.sum()) for mb in batches))}
    result = {}
    straight = _backend_at_lr(hf, lr_saved)
    straight.train_step(batches, loss_fn, normalisers)
    with release_019.saving_like_release_019():
        straight.save_checkpoint(ckpt_dir)
    result["common_files"] = sorted(part for part in ("model", "optimizer")
                                    if os.path.exists(os.path.join(ckpt_dir, part, "common.pt")))
    # common.pt holds what the 0.19 files hold
    optimizer_dir = os.path.join(ckpt_dir, "optimizer")
    inside = release_019.common_state_in_files(optimizer_dir)
    result["saved_step"] = inside["step"]
    if result["common_files"]:
        result["common_equal"] = repr(torch.load(os.path.join(optimizer_dir, "common.pt"))) == repr(inside)
    straight.train = dataclasses.replace(straight.train, lr=lr_resumed)
    result["straight_lr"] = straight.train_step(batches, loss_fn, normalisers).learning_rate
    result["straight_weights"] = _exported_like_parameters(straight, None)

    resumed = _backend_at_lr(tiny_hf_model(tie=False, seed=123), lr_resumed)
    resumed.load_checkpoint(ckpt_dir)  # the installed megatron-core (0.16.1) reads it
    result["resumed_step_count"] = resumed.step_count
    result["resumed_lr"] = resumed.train_step(batches, loss_fn, normalisers).learning_rate
    result["resumed_weights"] = _exported_like_parameters(resumed, None)

    os.remove(os.path.join(ckpt_dir, "model", "common.pt"))
    try:
        _backend_at_lr(hf, lr_resumed).load_checkpoint(ckpt_dir)
        result["refusal"] = None
    except Exception as error:  # noqa: BLE001 - the test asserts its type and message
        result["refusal"] = (type(error).__name__, str(error))
    torch.save(result, os.path.join(out_dir, "release_019_checkpoint.pt"))
    destroy_parallel()


def param_dtype_worker(rank, world, port, out_dir):
    """Build the local-spec model in bf16 at TP=``world``, with and without sequence parallelism, for
    Qwen2.5-VL (QKV bias) and Qwen3-VL (QK norms); record every parameter's dtype, the norm classes
    and their ``sequence_parallel`` marks."""
    from care_megatron.config.schema import ParallelConfig
    from care_megatron.training.megatron import cpu_compat
    from care_megatron.training.megatron.model_provider import QwenVLMegatronModel, text_facts_from_hf
    from care_megatron.training.megatron.parallel_state import destroy_parallel, initialize_parallel

    from _megatron_fixtures import tiny_hf_config, tiny_qwen3_vl_config

    _setup(rank, world, port)
    result = {}
    for arch, config in (("qwen2_5_vl", tiny_hf_config()), ("qwen3_vl", tiny_qwen3_vl_config())):
        for sp in (False, True):
            parallel = ParallelConfig(backend="megatron", tensor_model_parallel_size=world, sequence_parallel=sp,
                                      transformer_impl="local")
            initialize_parallel(parallel, force_cpu=True)
            with cpu_compat.model_construction():
                model = QwenVLMegatronModel(config, text_facts_from_hf(config, arch), parallel, torch.bfloat16,
                                            use_cpu_initialization=True)
            norms = {name: (type(module).__name__, bool(getattr(module.weight, "sequence_parallel", False)))
                     for name, module in model.named_modules() if name.endswith("layernorm") and hasattr(module, "weight")}
            result[(arch, sp)] = {"dtypes": {name: p.dtype for name, p in model.named_parameters()}, "norms": norms}
    if rank == 0:
        torch.save(result, os.path.join(out_dir, "param_dtypes.pt"))
    destroy_parallel()
