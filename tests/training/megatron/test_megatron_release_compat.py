"""What megatron-core 0.19.x (the ``[megatron]`` extra on Python 3.12 GPU nodes) changes, checked on
the CPU suite's 0.16.1 with ``_megatron_release_019`` standing in for the 0.19.2 behaviour:

* resume after changing ``train.lr``: 0.19 pairs saved and current optimizer parameter groups on
  ``max_lr`` / ``min_lr`` / ... (``MegatronOptimizerAdapter`` must load regardless);
* a checkpoint saved by 0.19 has no ``common.pt``, which 0.16.1 needs (the writer adds it; a reader
  refuses one without it, naming both releases);
* the local spec's norms are built in the parameters' dtype (bf16 with and without SP);
* the optimizer log line names the Adam megatron-core really built.
"""
import os
import socket
import sys
import types

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("megatron.core")

import _megatron_release_019 as release_019  # noqa: E402
import _megatron_workers as workers  # noqa: E402

from care_megatron.training.megatron import optimizer as optimizer_module  # noqa: E402


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- item 10: resume under another lr
class Release019StandIn:
    """What ``get_megatron_optimizer`` returns, reduced to what the adapter touches: a chained
    optimizer whose parameter groups are laid out as both releases' ``_get_param_groups`` builds them
    with the standard overrides (``max_lr = config.lr``, ``min_lr = config.min_lr``, ``wd_mult`` 0 for
    1-D parameters and biases; printed from 0.16.1 and 0.19.2 alike), an inner torch AdamW, and
    ``load_state_dict`` pairing the saved groups with the current ones by 0.19.2's rule, as
    ``FP32Optimizer.load_state_dict`` does."""

    def __init__(self, config, chunks):
        params = [p for chunk in chunks for p in chunk.parameters()]
        common = dict(is_expert_parallel=False, default_config=True, lr_mult=1.0, is_decoupled_lr=False,
                      max_lr=config.lr, min_lr=config.min_lr)
        groups = [dict(params=[p for p in params if p.dim() > 1], wd_mult=1.0, **common),
                  dict(params=[p for p in params if p.dim() == 1], wd_mult=0.0, **common)]
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        self.chained_optimizers = [self]

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state):
        state["param_groups"] = release_019.match_saved_groups(self.optimizer.param_groups, state["param_groups"])
        self.optimizer.load_state_dict(state)


def _adapter(monkeypatch, lr, model, stand_in=Release019StandIn):
    import megatron.core.optimizer as megatron_optimizer

    monkeypatch.setattr(megatron_optimizer, "get_megatron_optimizer", stand_in)
    return optimizer_module.MegatronOptimizerAdapter(model, torch.float32, lr=lr, weight_decay=0.1, clip=1.0,
                                                     use_distributed_optimizer=False)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))


def _step(adapter, model, lr):
    adapter.set_lr(lr)
    model(torch.ones(2, 4)).square().sum().backward()
    adapter.optimizer.optimizer.step()
    adapter.optimizer.optimizer.zero_grad()


def test_stand_in_refuses_what_release_019_refuses(monkeypatch):
    """Guards the stand-in: the groups as Megatron builds them, saved at one lr, find no partner at
    another under 0.19.2's rule (the ValueError a resume after changing ``train.lr`` raised)."""
    model = _model()
    saved = Release019StandIn(types.SimpleNamespace(lr=1e-5, min_lr=0.0, weight_decay=0.1), [model]).state_dict()
    current = Release019StandIn(types.SimpleNamespace(lr=3e-5, min_lr=0.0, weight_decay=0.1), [model])
    with pytest.raises(ValueError, match="Could not find parameter group"):
        current.load_state_dict(saved)


def test_resume_under_another_lr_loads_state_by_release_019_group_matching(monkeypatch):
    """Checkpoint at ``train.lr`` 1e-5, resume at 3e-5: the groups pair up (one per ``wd_mult``), the
    moments come back exactly, and the next step runs at the new lr."""
    model = _model()
    saving = _adapter(monkeypatch, 1e-5, model)
    _step(saving, model, 1e-5)
    saved_state = saving.state_dict()
    moments = {k: v["exp_avg"].clone() for k, v in saved_state["state"].items()}
    resumed = _adapter(monkeypatch, 3e-5, model)
    resumed.load_sharded_state_dict(saved_state)
    inner = resumed.optimizer.optimizer
    assert [g["wd_mult"] for g in inner.param_groups] == [1.0, 0.0]
    for index, p in enumerate(p for g in inner.param_groups for p in g["params"]):
        assert torch.equal(inner.state[p]["exp_avg"], moments[index])
    resumed.set_lr(3e-5)
    assert {g["lr"] for g in inner.param_groups} == {3e-5}


@pytest.mark.parametrize("layout", ["fp32", "mixed_precision", "distributed", "chained"])
def test_checkpoint_groups_with_a_schedule_lose_it_before_loading(layout):
    """A checkpoint written before the fix (groups with ``max_lr``) pairs with today's groups: the
    schedule keys are cleared wherever Megatron's optimizers keep ``param_groups``."""
    groups = lambda: [dict(wd_mult=1.0, lr_mult=1.0, is_expert_parallel=False, is_decoupled_lr=False, max_lr=1e-5,  # noqa: E731
                           min_lr=0.0, params=[0])]
    states = {"fp32": {"state": {}, "param_groups": groups()},
              "mixed_precision": {"optimizer": {"state": {}, "param_groups": groups()}, "grad_scaler": {}},
              "distributed": {"optimizer": {"param_groups": groups()}, "param_state": {}, "param_state_sharding_type": "x"},
              "chained": {0: {"optimizer": {"param_groups": groups()}}, 1: {"optimizer": {"param_groups": groups()}}}}
    state = states[layout]
    found = list(optimizer_module.saved_param_groups(state))
    assert len(found) == (2 if layout == "chained" else 1)
    current = groups()
    optimizer_module.detach_lr_schedule(current)
    for saved in found:
        optimizer_module.detach_lr_schedule(saved)
        assert release_019.match_saved_groups(current, saved)[0]["max_lr"] is None


# ----------------------------------------------------------------------------- item 14: which Adam
class _TransformerEngineFusedAdam(torch.optim.AdamW):
    """Where megatron-core's first choice lives: ``transformer_engine.pytorch.optimizers.fused_adam``."""


_TransformerEngineFusedAdam.__name__ = "FusedAdam"
_TransformerEngineFusedAdam.__module__ = "transformer_engine.pytorch.optimizers.fused_adam"


def test_log_names_the_adam_megatron_built_not_apex_because_it_imports(monkeypatch):
    """megatron-core 0.16.1 and 0.19.2 try Transformer Engine's FusedAdam before apex's. With apex
    importable and the optimizer built from TE's class, the name says TE (it used to say apex)."""
    apex, apex_optimizers = types.ModuleType("apex"), types.ModuleType("apex.optimizers")
    apex_optimizers.FusedAdam = torch.optim.AdamW
    apex.optimizers = apex_optimizers
    monkeypatch.setitem(sys.modules, "apex", apex)
    monkeypatch.setitem(sys.modules, "apex.optimizers", apex_optimizers)

    def built_with_te(config, chunks):
        inner = _TransformerEngineFusedAdam([p for c in chunks for p in c.parameters()], lr=config.lr)
        return types.SimpleNamespace(chained_optimizers=[types.SimpleNamespace(optimizer=inner)],
                                     param_groups=inner.param_groups)

    adapter = _adapter(monkeypatch, 1e-5, _model(), stand_in=built_with_te)
    assert adapter.name == "megatron adam (transformer_engine FusedAdam)"


def test_log_names_torch_adamw_when_megatron_falls_back_to_it(monkeypatch):
    """Here neither TE nor apex imports: the installed megatron-core bound ``Adam`` to torch's AdamW."""
    from megatron.core.optimizer import Adam

    assert Adam is torch.optim.AdamW

    def built_with_fallback(config, chunks):
        inner = Adam([p for c in chunks for p in c.parameters()], lr=config.lr)
        empty_rank = types.SimpleNamespace(optimizer=None)  # a chained optimizer without parameters here
        return types.SimpleNamespace(chained_optimizers=[types.SimpleNamespace(optimizer=inner), empty_rank],
                                     param_groups=inner.param_groups)

    assert _adapter(monkeypatch, 1e-5, _model(), stand_in=built_with_fallback).name == "megatron adam (torch AdamW)"


# ----------------------------------------------------------------------------- item 11 (+ item 10 on the CPU path)
@pytest.fixture(scope="module")
def release_019_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("release_019")
    mp.start_processes(workers.release_019_checkpoint_worker,
                       args=(1, _port(), str(out), str(out / "ckpt"), 1e-3, 3e-3), nprocs=1, join=True,
                       start_method="spawn")
    return torch.load(out / "release_019_checkpoint.pt")


@pytest.mark.distributed
def test_checkpoint_saved_as_release_019_carries_common_file_and_loads_with_0_16(release_019_checkpoint):
    """Saved the 0.19 way (common state inside the torch_dist files, no ``common.pt`` written by the
    release), the checkpoint still gets ``common.pt`` with the same content, and megatron-core 0.16.1
    (this suite's) loads it: step count and the next step are the uninterrupted run's."""
    result = release_019_checkpoint
    assert result["common_files"] == ["model", "optimizer"]
    assert result["common_equal"] and result["saved_step"] == 1
    assert result["resumed_step_count"] == 1
    straight, resumed = result["straight_weights"], result["resumed_weights"]
    assert max(float((straight[n] - resumed[n]).abs().max()) for n in straight) < 1e-6


@pytest.mark.distributed
def test_resume_under_another_lr_on_the_cpu_path(release_019_checkpoint):
    """Saved at lr 1e-3, resumed at 3e-3: the step after the resume runs at 3e-3 and lands where the
    uninterrupted run that switched to 3e-3 did (the weights check above)."""
    assert release_019_checkpoint["straight_lr"] == release_019_checkpoint["resumed_lr"] == 3e-3


@pytest.mark.distributed
def test_checkpoint_without_common_file_is_refused_naming_both_releases(release_019_checkpoint):
    kind, message = release_019_checkpoint["refusal"]
    assert kind == "RuntimeError"
    assert "common.pt" in message and "0.19" in message and "0.16.1" in message and "Python 3.11" in message


# ----------------------------------------------------------------------------- item 13: norm dtypes
@pytest.mark.distributed
def test_local_spec_builds_every_parameter_in_bf16_with_and_without_sequence_parallelism(tmp_path):
    """TP=2, bf16, both architectures: every parameter (norms included: input, pre-MLP, QK, final) is
    bf16; the norms carry the ``sequence_parallel`` mark exactly under SP."""
    mp.start_processes(workers.param_dtype_worker, args=(2, _port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    result = torch.load(os.path.join(tmp_path, "param_dtypes.pt"))
    for (arch, sp), built in result.items():
        not_bf16 = {name: dtype for name, dtype in built["dtypes"].items() if dtype != torch.bfloat16}
        assert not not_bf16, (arch, sp, not_bf16)
        norms = built["norms"]
        expected = {"input_layernorm", "pre_mlp_layernorm", "final_layernorm"}
        expected |= {"q_layernorm", "k_layernorm"} if arch == "qwen3_vl" else set()
        assert {name.rsplit(".", 1)[-1] for name in norms} == expected, (arch, sorted(norms))
        assert all(kind == "LocalRMSNorm" and marked == sp for kind, marked in norms.values()), (arch, sp, norms)
