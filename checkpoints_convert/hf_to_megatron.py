"""Convert a Hugging Face checkpoint directory into a Megatron checkpoint.

    python checkpoints_convert/hf_to_megatron.py --hf-dir D --out O --tp N --pp M [--vp V]
        [--format torch_dist|legacy] [--layernorm-naming local|te] [--dtype bfloat16]

``torch_dist`` (default): a Megatron distributed checkpoint of global tensors that Megatron reshards
to any TP / PP on load; ``--tp`` fixes only the vocab padding (``128 * tp``) and is validated
against the model together with ``--pp`` / ``--vp``. ``legacy``: per-rank
``mp_rank_XX[_YYY]/model_optim_rng.pt`` files for exactly that TP / PP / VP.

Memory: safetensors are read tensor by tensor through memory maps, each tensor converted and
dropped; the output (the template model or the per-rank dicts) is the only full copy held.
See :mod:`checkpoints_convert.megatron_io` for the directory layout.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from care_megatron.models.weight_mapping import mapping_for_config
from care_megatron.models.weight_mapping.rules import (ParallelLayout, canonicalise_hf_names, check_coverage,
                                                       dims_from_config, hf_to_megatron_state_dicts, layer_placement,
                                                       padded_vocab_size, tensor_rules, text_config_of,
                                                       vision_names_of)
from checkpoints_convert.hf_io import LazySafetensors, copy_hf_assets, torch_dtype_of
from checkpoints_convert import megatron_io

FORMATS = ("torch_dist", "legacy")


def convert_hf_to_megatron(hf_dir: str, out_dir: str, tp: int = 1, pp: int = 1, vp: Optional[int] = None,
                           fmt: str = "torch_dist", layernorm_naming: str = "local", dtype: Optional[str] = None,
                           show_progress: bool = True) -> dict:
    """Convert ``hf_dir`` into ``out_dir``; returns the metadata also written to ``conversion.json``."""
    from transformers import AutoConfig

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "torch_dist" and layernorm_naming != "local":
        # torch_dist keys are spec-independent (megatron maps local names to TE names itself).
        raise ValueError("--layernorm-naming only applies to --format legacy (torch_dist keys are spec-independent)")
    hf_config = AutoConfig.from_pretrained(hf_dir)
    spec = mapping_for_config(hf_config)
    dims = dims_from_config(spec, hf_config)
    dims.check_tensor_parallel(tp)
    layer_placement(dims.num_layers, pp, vp)  # validates the pipeline split before reading weights
    source = LazySafetensors(hf_dir)
    names = canonicalise_hf_names(spec, source.keys())
    target_dtype = torch_dtype_of(dtype) or source.dtype()
    os.makedirs(out_dir, exist_ok=True)
    copy_hf_assets(hf_dir, os.path.join(out_dir, megatron_io.HF_ASSETS_DIR))

    cast_source = _CastOnRead(source, target_dtype)

    def fetch(rule):
        return [cast_source[names[n]] for n in rule.hf_names]

    progress_bar = None
    if fmt == "torch_dist":
        layout = ParallelLayout(tp=1, pp=1, padded_vocab=padded_vocab_size(dims.vocab_size, tp))
        rules = tensor_rules(spec, dims, layout, vision_names_of(spec, names))
        check_coverage(spec, dims, rules, names)
        progress_bar = _progress(len(rules), show_progress)
        metadata = megatron_io.save_torch_dist(
            out_dir, rules, fetch, spec, dims, tp, target_dtype,
            getattr(text_config_of(hf_config), "rms_norm_eps", 1e-6), progress=lambda rule: progress_bar.update(1))
    else:
        layout = ParallelLayout(tp=tp, pp=pp, vp=vp, layernorm_naming=layernorm_naming)
        rules_count = len(tensor_rules(spec, dims, layout, vision_names_of(spec, names)))
        progress_bar = _progress(rules_count, show_progress)
        shards = hf_to_megatron_state_dicts(cast_source, hf_config, tp=tp, pp=pp, vp=vp,
                                            layernorm_naming=layernorm_naming, spec=spec,
                                            progress=lambda rule: progress_bar.update(1))
        metadata = megatron_io.save_legacy(out_dir, shards, layout)
        metadata["padded_vocab_size"] = layout.padded_vocab_for(dims.vocab_size)
    progress_bar.close()
    metadata.update(architecture=spec.name, tp=tp, pp=pp, vp=vp, layernorm_naming=layernorm_naming,
                    dtype=str(target_dtype).replace("torch.", ""), vocab_size=dims.vocab_size,
                    num_layers=dims.num_layers, tie_word_embeddings=dims.tie_word_embeddings,
                    hf_assets=megatron_io.HF_ASSETS_DIR)
    megatron_io.write_conversion_metadata(out_dir, metadata)
    return metadata


class _CastOnRead:
    """Mapping view of a lazy HF checkpoint that casts floating tensors to ``dtype`` as they are read."""

    def __init__(self, source: LazySafetensors, dtype: torch.dtype):
        self.source, self.dtype = source, dtype

    def keys(self):
        return self.source.keys()

    def __getitem__(self, name):
        tensor = self.source[name]
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="converting tensors", unit="tensor", disable=not enabled)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="Hugging Face model directory (safetensors)")
    parser.add_argument("--out", required=True, help="output Megatron checkpoint directory")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (vocab padding; legacy shards)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (validated; legacy shards)")
    parser.add_argument("--vp", type=int, default=None, help="virtual pipeline chunks per rank")
    parser.add_argument("--format", default="torch_dist", choices=FORMATS)
    parser.add_argument("--layernorm-naming", default="local", choices=("local", "te"),
                        help="legacy format only: local-spec or TE-spec names of the fused norms")
    parser.add_argument("--dtype", default=None, help="cast weights (bfloat16, float16, float32); default: as stored")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        metadata = convert_hf_to_megatron(args.hf_dir, args.out, args.tp, args.pp, args.vp, args.format,
                                          args.layernorm_naming, args.dtype, not args.no_progress)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {metadata['format']} checkpoint of {metadata['architecture']} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
