"""One rank of the 2-process gloo export test: python export_worker.py RANK PORT HF_DIR OUT_PREFIX

Scenario "tp2": TP group = both ranks. Scenario "pp2vp2": PP group = both ranks, two virtual chunks
each. Each rank saves what it received to OUT_PREFIX.<scenario>.rank<R>.pt.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
import torch.distributed as dist


def main(rank: int, port: str, hf_dir: str, out_prefix: str) -> None:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from care_megatron.training.megatron.weight_export import export_hf_weights
    from care_megatron.models.weight_mapping import hf_to_megatron_state_dicts
    from tiny_models import module_from_state_dict

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    config = AutoConfig.from_pretrained(hf_dir)
    hf = load_file(os.path.join(hf_dir, "model.safetensors"))

    shards = hf_to_megatron_state_dicts(hf, config, tp=2, pp=1)
    model = module_from_state_dict({"language_model." + k if not k.startswith("vision_model.") else "vision." + k: v
                                    for k, v in shards[(0, rank)].items()})
    buckets = list(export_hf_weights(model, config, bucket_bytes=60_000, tp_group=dist.group.WORLD))
    torch.save(buckets, f"{out_prefix}.tp2.rank{rank}.pt")

    shards = hf_to_megatron_state_dicts(hf, config, tp=1, pp=2, vp=2)
    chunks = [module_from_state_dict(shards[(rank, 0, v)]) for v in range(2)]
    buckets = list(export_hf_weights(chunks, config, bucket_bytes=60_000, dtype=torch.bfloat16,
                                     pp_group=dist.group.WORLD))
    torch.save(buckets, f"{out_prefix}.pp2vp2.rank{rank}.pt")
    # views on the owning stage (no cast): the broadcast needs them contiguous
    buckets = [[(name, tensor.clone()) for name, tensor in bucket]
               for bucket in export_hf_weights(chunks, config, bucket_bytes=60_000, pp_group=dist.group.WORLD, views=True)]
    torch.save(buckets, f"{out_prefix}.pp2vp2_views.rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), *sys.argv[2:])
