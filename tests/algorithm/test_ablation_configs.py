"""Every ablation config (examples/configs/ablations/) loads, differs from the embedded default only
in its algorithm section (and output directory), and sets the switch its name says."""
import dataclasses
from pathlib import Path

import pytest

from care_megatron.algorithm.care import CareConfig
from care_megatron.config import load_config

ROOT = Path(__file__).resolve().parents[2]
ABLATIONS = ROOT / "examples/configs/ablations"

# file -> (algorithm.name, rgr, rgr_mode, CareConfig fields that differ from the defaults)
EXPECTED = {
    "table2_grpo": ("grpo", True, "repair", {}),
    "table2_care_no_rgr": ("care", False, "repair", {}),
    "table2_care": ("care", True, "repair", {}),
    "rgr_resample": ("care", True, "resample", {}),
    "rgr_fresh": ("care", True, "fresh", {}),
    "region_answer_only": ("care", True, "repair", {"think_weight_pos": 0.0}),
    "region_fail_think_unmasked": ("care", True, "repair", {"think_weight_neg": 0.005}),
    "rescue_off": ("care", True, "repair", {"rescue": False}),
    "anchor_random": ("care", True, "repair", {"anchor_rule": "random"}),
    "anchor_shortest_think": ("care", True, "repair", {"anchor_rule": "shortest_think"}),
    "selector_random": ("care", True, "repair", {"negative_selector": "random"}),
    "selector_farthest": ("care", True, "repair", {"negative_selector": "farthest"}),
    "selector_mixed": ("care", True, "repair", {"negative_selector": "mixed"}),
    **{f"k{k}_eq_{eq}": ("care", True, "repair", {**({} if eq == "on" else {"equalize": False}), **({} if k == 4 else {"k": k})})
       for k in (2, 4, 6) for eq in ("on", "off")},
    **{f"reflect_neg_scale_{s.replace('.', 'p')}": ("care", True, "repair",
                                                    {} if s == "0.25" else {"reflect_neg_scale": float(s)})
       for s in ("0.1", "0.25", "0.5", "1.0")},
    **{f"neg_scale_{s.replace('.', 'p')}": ("care", True, "repair", {} if s == "0.5" else {"neg_scale": float(s)})
       for s in ("0.25", "0.5", "0.75", "1.0")},
}


def test_every_ablation_file_is_listed():
    assert sorted(p.stem for p in ABLATIONS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_ablation_config_loads_and_sets_its_switch(name):
    config = load_config(ABLATIONS / f"{name}.yaml")
    default = load_config(ROOT / "examples/configs/tiny_cpu.yaml")
    for section in ("model", "parallel", "rollout", "data"):
        assert getattr(config, section) == getattr(default, section), section
    assert dataclasses.replace(config.train, output_dir=default.train.output_dir) == default.train
    assert config.train.output_dir == f"runs/ablations/{name}"
    method, rgr, mode, care_fields = EXPECTED[name]
    algo = config.algorithm
    assert (algo.name, algo.rgr, algo.rgr_mode) == (method, rgr, mode)
    assert (algo.dual_clip, algo.kl_clamp) == (3.0, 10.0)  # the safety limits stay on in every ablation
    care, reference = CareConfig(**algo.care), CareConfig()
    differs = {f.name: getattr(care, f.name) for f in dataclasses.fields(CareConfig)
               if getattr(care, f.name) != getattr(reference, f.name)}
    assert differs == care_fields
