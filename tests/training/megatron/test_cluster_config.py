"""Cluster-path configuration that is plain Python and so checkable on CPU: the ``TransformerConfig``
the backend builds for every FP8 setting, the FP8 GEMM token alignment of packed micro-batches, and
the local spec's final norm when apex is installed without Transformer Engine."""
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("megatron.core")

from care_megatron.config.schema import ParallelConfig  # noqa: E402
from care_megatron.training.megatron import te as te_module  # noqa: E402
from care_megatron.training.megatron.model_provider import text_facts_from_hf, transformer_config_from_hf  # noqa: E402

from _megatron_fixtures import tiny_hf_config  # noqa: E402


def _facts(layers: int = 4):
    return text_facts_from_hf(tiny_hf_config(layers=layers), "qwen2_5_vl")


def _te_config(parallel: ParallelConfig, monkeypatch, layers: int = 4):
    """What ``QwenVLMegatronModel`` builds for ``transformer_impl=transformer_engine`` (TE faked as
    importable: megatron-core's FP8 checks in ``TransformerConfig.__post_init__`` do not import it)."""
    monkeypatch.setattr(te_module, "transformer_engine_available", lambda: True)
    return transformer_config_from_hf(_facts(layers), parallel, torch.bfloat16, use_cpu_initialization=True,
                                      impl="transformer_engine")


@pytest.mark.parametrize("fp8", ["hybrid", "e4m3"])
@pytest.mark.parametrize("recipe", ["tensorwise", "delayed", "blockwise", "mxfp8"])
@pytest.mark.parametrize("first_last_bf16", [True, False])
@pytest.mark.parametrize("pp", [1, 2])
def test_every_fp8_setting_builds_a_transformer_config_or_fails_at_config_time(monkeypatch, fp8, recipe,
                                                                               first_last_bf16, pp):
    fields = dict(backend="megatron", transformer_impl="transformer_engine", fp8=fp8, fp8_recipe=recipe,
                  fp8_first_last_bf16=first_last_bf16, pipeline_model_parallel_size=pp)
    if recipe == "delayed" and first_last_bf16:
        # megatron-core refuses this pair in TransformerConfig.__post_init__; the run config says so first
        with pytest.raises(ValueError, match="parallel.fp8_first_last_bf16"):
            ParallelConfig(**fields)
        return
    config = _te_config(ParallelConfig(**fields), monkeypatch)
    assert config.fp8 == fp8 and config.fp8_recipe == recipe
    assert config.first_last_layers_bf16 == first_last_bf16
    if first_last_bf16:
        assert config.num_layers_at_start_in_bf16 == config.num_layers_at_end_in_bf16 == 1
    if recipe == "delayed":
        assert config.fp8_amax_history_len == 1024 and config.fp8_amax_compute_algo == "max"


def test_default_fp8_config_builds(monkeypatch):
    """The defaults (first / last layers bf16) with only ``parallel.fp8`` set: the case that crashed."""
    parallel = ParallelConfig(backend="megatron", transformer_impl="transformer_engine", fp8="hybrid")
    assert parallel.fp8_first_last_bf16 and parallel.fp8_recipe == "tensorwise"
    config = _te_config(parallel, monkeypatch)
    assert config.fp8_recipe == "tensorwise" and config.first_last_layers_bf16


def test_megatron_itself_refuses_delayed_with_bf16_edges():
    """Guards the test above: the pair the old default produced really fails in megatron-core."""
    from megatron.core.transformer import TransformerConfig

    with pytest.raises(ValueError, match="Delayed scaling"):
        TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, fp8="hybrid", fp8_recipe="delayed",
                          first_last_layers_bf16=True)


def test_fp8_without_transformer_engine_names_the_extra(monkeypatch):
    monkeypatch.setattr(te_module, "transformer_engine_available", lambda: False)
    parallel = ParallelConfig(backend="megatron", transformer_impl="auto", fp8="hybrid")
    with pytest.raises(ImportError, match=r"care_megatron\[te\]"):
        transformer_config_from_hf(_facts(), parallel, torch.bfloat16, use_cpu_initialization=True, impl="local")


def test_bad_fp8_recipe_is_a_config_error():
    with pytest.raises(ValueError, match="parallel.fp8_recipe"):
        ParallelConfig(backend="megatron", fp8="hybrid", fp8_recipe="current")


# ----------------------------------------------------------------------------- FP8 GEMM token alignment
@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (2, True), (4, True)])
@pytest.mark.parametrize("recipe", [None, "tensorwise", "delayed", "mxfp8"])
def test_packed_micro_batches_meet_the_fp8_gemm_rule(tp, sp, recipe):
    """Every packed micro-batch (the trainer packs with ``backend.pack_multiple``) gives each rank's
    GEMMs a token count divisible by megatron-core's ``get_fp8_align_size`` (T / TP under SP)."""
    from megatron.core.enums import Fp8Recipe
    from megatron.core.fp8_utils import get_fp8_align_size

    from care_megatron.data.batch import Sequence
    from care_megatron.data.packing import pack_sequences
    from care_megatron.training.megatron.backend import MegatronBackend

    config = SimpleNamespace(fp8="hybrid" if recipe else None, fp8_recipe=recipe or "delayed")
    fake = SimpleNamespace(dist={"tp_size": tp}, parallel=SimpleNamespace(sequence_parallel=sp),
                           policy=SimpleNamespace(config=config))
    multiple = MegatronBackend.pack_multiple.fget(fake)
    align = get_fp8_align_size(Fp8Recipe(recipe)) if recipe else 1
    g = torch.Generator().manual_seed(0)
    sequences = [Sequence(input_ids=torch.randint(3, 100, (n,), generator=g), loss_mask=torch.ones(n, dtype=torch.bool),
                          region_ids=torch.zeros(n, dtype=torch.long)) for n in (5, 17, 33, 9, 61, 2)]
    packed = pack_sequences(sequences, token_budget=256, pad_multiple=multiple)
    for mb in packed:
        rows_per_rank = mb.num_tokens // (tp if sp else 1)
        assert mb.num_tokens % (tp if sp else 1) == 0 and rows_per_rank % align == 0, (mb.num_tokens, tp, sp, recipe)
    if recipe is None:
        assert multiple == (tp if sp else 1)  # no FP8: no extra padding


@pytest.mark.parametrize("cp,tp,sp", [(2, 1, False), (2, 2, True), (4, 1, False)])
@pytest.mark.parametrize("recipe", [None, "tensorwise", "mxfp8"])
def test_context_parallel_layout_meets_the_fp8_gemm_rule(monkeypatch, cp, tp, sp, recipe):
    """Under CP the layout pads per sequence; each rank's rows (total / CP, then / TP under SP) must
    still divide by the FP8 alignment."""
    from megatron.core import parallel_state as mps

    from care_megatron.training.megatron.packed_forward import context_parallel_layout
    from _megatron_fixtures import pack, make_sequence, tiny_hf_model

    hf = tiny_hf_model()
    g = torch.Generator().manual_seed(3)
    batch = pack([make_sequence(hf, g, 1, 5, 7), make_sequence(hf, g, 0, 3, 4)])
    monkeypatch.setattr(mps, "get_context_parallel_rank", lambda: 0)
    config = SimpleNamespace(context_parallel_size=cp, tensor_model_parallel_size=tp, sequence_parallel=sp,
                             fp8="hybrid" if recipe else None, fp8_recipe=recipe or "delayed")
    model = SimpleNamespace(config=config, facts=SimpleNamespace(image_token_id=290))
    layout = context_parallel_layout(model, batch)
    align = te_module.fp8_token_alignment(recipe)
    per_rank = layout.num_padded_tokens // cp
    assert layout.num_padded_tokens % (2 * cp) == 0
    assert per_rank % (tp if sp else 1) == 0 and (per_rank // (tp if sp else 1)) % align == 0, layout.num_padded_tokens


# ----------------------------------------------------------------------------- final norm with apex, no TE
def test_local_spec_final_norm_is_torch_rmsnorm_with_apex_installed(tmp_path):
    """With apex importable and TE not, megatron-core's block default final norm is apex's
    ``FusedLayerNorm`` (LayerNorm only). A fresh interpreter with a stand-in ``apex`` module shows the
    default really is FusedLayerNorm there, and that the local spec's norms build as torch RMSNorm
    (:class:`LocalRMSNorm`, a ``torch.nn.RMSNorm``)."""
    script = textwrap.dedent("""
        import sys, types
        sys.modules["apex"] = types.ModuleType("apex")  # `import apex` succeeds: megatron sets HAVE_APEX
        import torch
        from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
        from megatron.core.transformer import transformer_block
        from care_megatron.config.schema import ParallelConfig
        from care_megatron.training.megatron.model_provider import text_facts_from_hf
        sys.path.insert(0, sys.argv[1])
        from _megatron_fixtures import tiny_hf_config

        te_missing = not transformer_block.HAVE_TE
        assert te_missing and transformer_block.LayerNormImpl is FusedLayerNorm, transformer_block.LayerNormImpl
        facts = text_facts_from_hf(tiny_hf_config(layers=2), "qwen2_5_vl")
        from care_megatron.training.megatron import cpu_compat
        from care_megatron.training.megatron.model_provider import LocalRMSNorm, QwenVLMegatronModel
        from care_megatron.training.megatron.parallel_state import destroy_parallel, initialize_parallel

        parallel = ParallelConfig(backend="megatron", transformer_impl="local")
        initialize_parallel(parallel, force_cpu=True)  # one-rank gloo group: the block counts its layers
        with cpu_compat.model_construction():
            model = QwenVLMegatronModel(tiny_hf_config(layers=2), facts, parallel, torch.float32,
                                        use_cpu_initialization=True)
        decoder = model.language_model.decoder
        final, layer = decoder.final_layernorm, decoder.layers[0].input_layernorm
        assert type(final) is LocalRMSNorm and type(layer) is LocalRMSNorm, (type(final), type(layer))
        x = torch.randn(3, 64)
        torch.testing.assert_close(final(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        destroy_parallel()
        print("ok")
    """)
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script, here], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
