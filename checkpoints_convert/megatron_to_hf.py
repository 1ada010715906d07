"""Convert a Megatron checkpoint written by ``hf_to_megatron.py`` back into a Hugging Face directory.

    python checkpoints_convert/megatron_to_hf.py --ckpt O --out D [--max-shard-size-mb 5120] [--dtype bfloat16]

Writes ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``)
and copies the config, generation config, tokenizer and processor files recorded with the
checkpoint, so ``from_pretrained(D)`` needs nothing else. Tensors are converted and written one
rule (one layer's projection) at a time; at most one output shard is held in memory besides the
loaded checkpoint.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from care_megatron.models.weight_mapping import get_mapping
from care_megatron.models.weight_mapping.rules import (ParallelLayout, dims_from_config, iter_megatron_to_hf,
                                                       text_config_of)
from checkpoints_convert import megatron_io
from checkpoints_convert.hf_io import DEFAULT_MAX_SHARD_BYTES, ShardedSafetensorsWriter, copy_hf_assets, torch_dtype_of


def convert_megatron_to_hf(ckpt_dir: str, out_dir: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                           dtype: Optional[str] = None, show_progress: bool = True,
                           hf_config_dir: Optional[str] = None) -> list[str]:
    """Convert ``ckpt_dir`` into the HF directory ``out_dir``; returns the safetensors file names.

    ``hf_config_dir`` (config, tokenizer, processor files) is required for a checkpoint the training
    backend saved itself (no ``conversion.json``) and overrides the recorded assets otherwise.
    """
    from tqdm import tqdm
    from transformers import AutoConfig

    if os.path.exists(os.path.join(ckpt_dir, megatron_io.CONVERSION_FILE)):
        metadata = megatron_io.read_conversion_metadata(ckpt_dir)
        assets = hf_config_dir or os.path.join(ckpt_dir, metadata.get("hf_assets", megatron_io.HF_ASSETS_DIR))
    elif hf_config_dir is not None:
        # A checkpoint the Megatron training backend saved (e.g. <run>/checkpoints/step_N/model):
        # everything but the config is in the torch_dist metadata.
        metadata = _metadata_from_training_checkpoint(ckpt_dir, hf_config_dir)
        assets = hf_config_dir
    else:
        raise FileNotFoundError(f"{ckpt_dir} has no {megatron_io.CONVERSION_FILE}; for a checkpoint saved by the "
                                "training backend pass --hf-config DIR (the run's HF config / tokenizer directory)")
    hf_config = AutoConfig.from_pretrained(assets)
    spec = get_mapping(metadata["architecture"])
    dims = dims_from_config(spec, hf_config)
    if dims.num_layers != metadata["num_layers"] or dims.vocab_size != metadata["vocab_size"]:
        raise ValueError(f"{assets}/config.json ({dims.num_layers} layers, vocab {dims.vocab_size}) does not match the "
                         f"checkpoint ({metadata['num_layers']} layers, vocab {metadata['vocab_size']})")
    stored_dtype = torch_dtype_of(metadata["dtype"])
    if metadata["format"] == "torch_dist":
        language_prefix = metadata.get("language_key_prefix", megatron_io.LANGUAGE_KEY_PREFIX)
        vision_prefix = metadata.get("vision_key_prefix", megatron_io.VISION_KEY_PREFIX)
        state = megatron_io.load_torch_dist(ckpt_dir, dims, metadata["padded_vocab_size"], metadata["vision_names"],
                                            stored_dtype, getattr(text_config_of(hf_config), "rms_norm_eps", 1e-6),
                                            language_prefix, vision_prefix)
        layout = ParallelLayout(tp=1, pp=1, padded_vocab=metadata["padded_vocab_size"])
        shards = {(0, 0): state}
    elif metadata["format"] == "legacy":
        layout = ParallelLayout(tp=metadata["tp"], pp=metadata["pp"], vp=metadata["vp"],
                                layernorm_naming=metadata["layernorm_naming"])
        shards = megatron_io.load_legacy(ckpt_dir, layout)
    else:
        raise ValueError(f"unknown checkpoint format {metadata['format']!r} in {ckpt_dir}/conversion.json")
    out_dtype = torch_dtype_of(dtype)
    writer = ShardedSafetensorsWriter(out_dir, max_shard_bytes)
    for name, tensor in tqdm(iter_megatron_to_hf(shards, hf_config, layout, spec), desc="writing HF tensors",
                             unit="tensor", disable=not show_progress):
        writer.add(name, tensor.to(out_dtype) if out_dtype is not None and tensor.is_floating_point() else tensor)
    files = writer.close()
    copy_hf_assets(assets, out_dir)
    if out_dtype is not None:
        _set_config_dtype(out_dir, str(out_dtype).replace("torch.", ""))
    return files


def _metadata_from_training_checkpoint(ckpt_dir: str, hf_config_dir: str) -> dict:
    import torch
    from transformers import AutoConfig

    from care_megatron.models.weight_mapping import mapping_for_config

    hf_config = AutoConfig.from_pretrained(hf_config_dir)
    spec = mapping_for_config(hf_config)
    dims = dims_from_config(spec, hf_config)
    padded, vision = megatron_io.torch_dist_layout(ckpt_dir)
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.float32
    dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype))
    return {"format": "torch_dist", "architecture": spec.name, "padded_vocab_size": padded, "vision_names": vision,
            "dtype": str(dtype).replace("torch.", ""), "num_layers": dims.num_layers, "vocab_size": dims.vocab_size}


def _set_config_dtype(out_dir: str, dtype_name: str) -> None:
    import json

    path = os.path.join(out_dir, "config.json")
    with open(path) as handle:
        config = json.load(handle)
    config["dtype"] = dtype_name
    with open(path, "w") as handle:
        json.dump(config, handle, indent=2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint directory written by hf_to_megatron.py")
    parser.add_argument("--out", required=True, help="output Hugging Face directory")
    parser.add_argument("--max-shard-size-mb", type=int, default=DEFAULT_MAX_SHARD_BYTES >> 20)
    parser.add_argument("--dtype", default=None, help="cast weights (bfloat16, float16, float32); default: as stored")
    parser.add_argument("--hf-config", default=None,
                        help="HF config/tokenizer directory (needed for checkpoints saved by the training backend)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        files = convert_megatron_to_hf(args.ckpt, args.out, args.max_shard_size_mb << 20, args.dtype,
                                       not args.no_progress, args.hf_config)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(files)} safetensors file(s) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
