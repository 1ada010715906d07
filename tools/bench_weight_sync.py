"""Weight-sync throughput: trainer weights -> rollout engine, against a plain copy of the same bytes.

Measures, in one run on one device, GB/s (1e9 bytes / s) of:

* ``plain_copy``: ``dst.copy_(src)`` tensor by tensor into preallocated tensors of the same shapes on
  the same device: the ceiling any sync path can reach;
* ``export_only``: the weight source alone (buckets produced and dropped);
* ``export_update_hf``: the Megatron-backend + HF-engine path as ``colocate.sync_weights`` runs it:
  weights streamed out of the Megatron exporter as Hugging-Face-named buckets with ``views=True``
  (views of the parameters wherever the HF layout allows, no copy), then
  ``HFRolloutEngine.update_weights`` (name mapping, shape check, in-place copy into the rollout model);
* ``export_update_hf_copies``: the same with ``views=False``, the exporter's default (every exported
  tensor fresh memory): the path ``sync_weights`` took before it asked for views;
* ``torch_export_update_hf``: the path the embedded default runs every step: the plain-PyTorch
  backend's ``TorchBackend.export_weights`` (its state dict in buckets, no copy), then
  ``HFRolloutEngine.update_weights``;
* ``fresh_copy``: every tensor copied into newly allocated memory (``clone``): what any exporter that
  materialises each HF tensor pays before the engine's own copy (on CPU the new pages' first-touch
  faults make it several times a copy into existing memory);
* ``flattened_bucket``: the in-process part of the colocated SGLang path: each bucket flattened
  into one tensor (``sglang_engine.flatten_bucket``, what gets CUDA-IPC-shared), then rebuilt and
  copied into the rollout model as SGLang's loader does. The IPC hand-off and SGLang's own loader
  are not included (they need SGLang on a GPU);
* ``flattened_bucket_reused``: the same with one flat buffer reused for every bucket
  (``flatten_bucket(..., out=buffer)``): what is left when no fresh memory is touched.

The weight source is ``care_megatron.training.megatron.weight_export.export_hf_weights`` run on the
trainer's weights converted to Megatron layout in this process (TP = PP = 1: the un-fusing of QKV
and gate/up and the vocab un-padding are timed, the TP / PP collectives are not); when that module
cannot be imported, the trainer model's ``state_dict`` grouped into buckets. The output says which.

Usage::

    python tools/bench_weight_sync.py                       # CPU, ~0.1 B-parameter Qwen2.5-VL-shaped model
    python tools/bench_weight_sync.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from care_megatron.rollout.hf_engine import HFRolloutEngine, checkpoint_name_to_module_name  # noqa: E402
from care_megatron.rollout.sglang_engine import bucket_named_tensors, flatten_bucket, unflatten_bucket  # noqa: E402


def hardware_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model}, {torch.get_num_threads()} torch threads"


def build_model(hidden: int, layers: int, vocab: int, dtype: torch.dtype, device: torch.device, seed: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    heads = max(hidden // 128, 2)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, bos_token_id=None, eos_token_id=0, pad_token_id=0, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=max(heads // 4, 1), max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": [hidden // heads // 8, hidden // heads * 3 // 16, hidden // heads * 3 // 16]}),
        vision_config=dict(depth=2, hidden_size=256, intermediate_size=512, num_heads=4, out_hidden_size=hidden,
                           fullatt_block_indexes=[1]),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    return model.to(dtype).eval()


def module_from_state_dict(state_dict: dict) -> torch.nn.Module:
    """An ``nn.Module`` tree whose ``named_parameters()`` are ``state_dict`` (the tensors themselves)."""
    root = torch.nn.Module()
    for name, tensor in state_dict.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=False))
    return root


def weight_source(model: torch.nn.Module, bucket_bytes: int):
    """(description, callable returning an iterator of HF-named buckets).

    Preferred: the Megatron exporter on the trainer's weights converted to Megatron layout (fused
    QKV, fused gate/up, padded vocab) in this one process (TP = PP = 1), so the timed path includes
    un-fusing them back to HF tensors. Fallback: the HF state dict in buckets.
    """
    try:
        from care_megatron.models.weight_mapping import get_mapping, hf_to_megatron_rank_state_dict
        from care_megatron.training.megatron.weight_export import export_hf_weights
    except Exception as exc:  # absent or not importable here: fall back, and say so
        why = f"{type(exc).__name__}: {exc}"
    else:
        config = model.config
        megatron_state = hf_to_megatron_rank_state_dict(
            {n: t.detach() for n, t in model.state_dict().items()}, config, 1, 0, spec=get_mapping(config.model_type))
        megatron_model = module_from_state_dict(megatron_state)
        return ("care_megatron.training.megatron.weight_export.export_hf_weights (Megatron layout, TP=PP=1)",
                lambda views=True: export_hf_weights(megatron_model, config, bucket_bytes, views=views))
    return (f"model.state_dict() in buckets (weight_export unavailable: {why})",
            lambda views=True: bucket_named_tensors(((n, t.detach()) for n, t in model.state_dict().items()),
                                                    bucket_bytes))


def timed(fn, device: torch.device, repeats: int) -> float:
    """Best-of-``repeats`` seconds of ``fn`` (after one warm-up), synchronising the device."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--bucket-mb", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    bucket_bytes = args.bucket_mb << 20
    trainer = build_model(args.hidden, args.layers, args.vocab, dtype, device, seed=0)
    rollout = build_model(args.hidden, args.layers, args.vocab, dtype, device, seed=1)
    engine = HFRolloutEngine(rollout, tokenizer=None, stop_token_ids=[0], pad_token_id=0)
    source_name, source = weight_source(trainer, bucket_bytes)

    src = [t.detach() for t in trainer.state_dict().values()]
    dst = [torch.empty_like(t) for t in src]
    total_bytes = sum(t.numel() * t.element_size() for t in src)

    def plain_copy():
        for d, s in zip(dst, src):
            d.copy_(s)

    def export_only():
        for bucket in source():
            del bucket

    def export_update_hf():
        engine.update_weights(pair for bucket in source(views=True) for pair in bucket)

    def export_update_hf_copies():
        engine.update_weights(pair for bucket in source(views=False) for pair in bucket)

    from care_megatron.training.torch_backend import TorchBackend

    torch_backend = TorchBackend(trainer, lr=0.0, keep_reference=False, device=device)

    def torch_export_update_hf():
        engine.update_weights(pair for bucket in torch_backend.export_weights(bucket_bytes) for pair in bucket)

    def fresh_copy():
        for s in src:
            s.clone()

    rollout_params = dict(rollout.named_parameters())

    class Meta:  # SGLang's FlattenedTensorMetadata has these fields
        def __init__(self, **kw):
            self.__dict__.update(kw)

    def flattened_payload(out=None):
        for bucket in source():
            flat, meta = flatten_bucket(bucket, Meta, out=out)
            for name, tensor in unflatten_bucket(flat, meta):
                rollout_params[checkpoint_name_to_module_name(name, rollout_params)].data.copy_(tensor)

    # one buffer sized for the largest bucket, allocated (and first touched) before timing
    buffer = torch.zeros(max(sum(t.numel() for _, t in bucket) for bucket in source()), dtype=dtype, device=device)

    results = {}
    for label, fn in (("plain_copy", plain_copy), ("fresh_copy", fresh_copy), ("export_only", export_only),
                      ("export_update_hf", export_update_hf), ("export_update_hf_copies", export_update_hf_copies),
                      ("torch_export_update_hf", torch_export_update_hf),
                      ("flattened_bucket", flattened_payload),
                      ("flattened_bucket_reused", lambda: flattened_payload(buffer))):
        seconds = timed(fn, device, args.repeats)
        results[label] = {"seconds": seconds, "GB_per_s": total_bytes / seconds / 1e9}
    # The sync must actually have synced: rollout == trainer afterwards.
    for (name, a), b in zip(trainer.state_dict().items(), rollout.state_dict().values()):
        if not torch.equal(a, b):
            raise SystemExit(f"weight sync left {name} different")

    report = {
        "hardware": hardware_name(device),
        "device": str(device),
        "dtype": args.dtype,
        "parameters": sum(t.numel() for t in src),
        "bytes": total_bytes,
        "bucket_mb": args.bucket_mb,
        "weight_source": source_name,
        "torch": torch.__version__,
        "results": results,
    }
    print(f"hardware: {report['hardware']}  dtype: {args.dtype}  weights: {total_bytes / 1e9:.3f} GB "
          f"({report['parameters'] / 1e6:.1f} M params), buckets of {args.bucket_mb} MiB")
    print(f"weight source: {source_name}")
    for label, r in results.items():
        ratio = r["GB_per_s"] / results["plain_copy"]["GB_per_s"]
        print(f"  {label:24s} {r['GB_per_s']:8.2f} GB/s  {r['seconds'] * 1e3:9.1f} ms  ({ratio:5.2f} x plain copy)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
