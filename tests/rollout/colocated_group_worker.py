"""One rank of the 2-process gloo check of ``update_weights_colocated_group`` (run by test_sglang_engine)."""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from care_megatron.rollout import sglang_engine as se  # noqa: E402
from sglang_fakes import FakeSerializer, fake_api  # noqa: E402


class RankTaggingSerializer:
    """Tags each payload with the rank that serialised it, so the owner can check the order."""

    @staticmethod
    def serialize(obj):
        return FakeSerializer.serialize({**obj, "origin_rank": dist.get_rank()})


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    api = fake_api()
    api.MultiprocessingSerializer = RankTaggingSerializer
    torch.manual_seed(0)  # every rank holds the same full tensors, as after the exporter's gathers
    state = [(f"model.layers.{i}.self_attn.q_proj.weight", torch.randn(64, 64)) for i in range(3)]
    state.append(("lm_head.weight", torch.randn(16, 64).bfloat16()))
    engine = None
    if rank == 0:
        engine = se.SGLangRolloutEngine(se.SGLangEngineConfig(model_path="m", tp_size=2, context_length=512), api=api)
        origins = []
        original = engine.engine.update_weights_from_tensor

        def recording(**kw):
            result = original(**kw)
            origins.append([b["origin_rank"] for b in engine.engine.received_by_rank])
            return result

        engine.engine.update_weights_from_tensor = recording
    sent = se.update_weights_colocated_group(engine, se.bucket_named_tensors(iter(state), 64 * 64 * 4 * 2), api=api,
                                             tp_rank=rank, tp_size=2, owner_rank=0)
    if rank == 0:
        calls = [name for name, _ in engine.engine.calls]
        exact = all(torch.equal(engine.engine.weights[n], t) for n, t in state)
        json.dump({"sent": sent, "origins": origins, "calls": calls, "exact": exact,
                   "names": sorted(engine.engine.weights)}, open(out_path, "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
