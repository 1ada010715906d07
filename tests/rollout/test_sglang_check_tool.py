"""``tools/sglang_check.py``'s CPU-testable parts: the weight names it sends and its sleep / wake cycle.

The tool itself needs SGLang and a GPU; these parts decide whether it can pass at all (issue 12.8):
transformers-5 module names make SGLang's Qwen2.5-VL loader raise KeyError, and a sleep / wake
without re-sending the weights decodes from freed memory.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from care_megatron.rollout import sglang_engine as se
from care_megatron.rollout.base import SamplingParams
from _rollout_helpers import make_request
from sglang_fakes import fake_api

TOOL = Path(__file__).resolve().parents[2] / "tools" / "sglang_check.py"

# Parameter prefixes of SGLang 0.5.3's Qwen2_5_VLForConditionalGeneration (models/qwen2_5_vl.py:
# self.visual, self.model = Qwen2Model (embed_tokens, layers, norm), self.lm_head), which its
# load_weights looks up verbatim; 0.5.23 maps the same names (hf_to_sglang_mapper's prefixes for
# the original checkpoint layout).
SGLANG_QWEN25VL_PREFIXES = ("visual.", "model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")


def load_tool():
    spec = importlib.util.spec_from_file_location("sglang_check", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_weights_are_sent_under_the_names_sglangs_loader_maps(model, tokenizer, tmp_path):
    from care_megatron.sft import save_policy

    save_policy(model, tokenizer, tmp_path / "hf")
    names = load_tool().checkpoint_names(model, tmp_path / "hf")
    assert set(names) == set(model.state_dict())  # every tensor of the policy has one
    assert len(set(names.values())) == len(names)
    assert all(n.startswith(SGLANG_QWEN25VL_PREFIXES) for n in names.values()), \
        sorted(n for n in names.values() if not n.startswith(SGLANG_QWEN25VL_PREFIXES))[:3]
    assert any(n.startswith("model.language_model.") for n in names)  # the module names differ


def test_sleep_wake_cycle_resends_the_weights(tokenizer, image_processor):
    engine = se.SGLangRolloutEngine(se.SGLangEngineConfig(model_path="m", context_length=512), tokenizer, api=fake_api())
    weights = {"lm_head.weight": torch.randn(4, 4)}
    engine.update_weights(iter(weights.items()))
    request = [make_request(tokenizer, image_processor, "a", "count")]
    out = {"output_ids": [30], "meta_info": {"finish_reason": {"type": "stop"}, "output_token_logprobs": [(-0.1, 30, None)]}}
    engine.engine.script = [[out]]
    refused = load_tool().sleep_wake_resend(engine, lambda: iter(weights.items()), request, SamplingParams())
    assert refused and not engine.asleep
    assert torch.equal(engine.engine.weights["lm_head.weight"], weights["lm_head.weight"])
    assert engine.generate(request, SamplingParams())[0].token_ids == [30]
