"""One rank of the converter <-> Megatron backend integration test (CPU, gloo, TP = world size).

    python backend_worker.py RANK WORLD PORT CKPT_DIR OUT_PATH

Builds the Megatron backend's own tiny Qwen2.5-VL fixture, starts MegatronBackend from ZEROED weights
(through the shared converter ``checkpoints_convert.qwen2_5_vl.hf_to_megatron``), loads the torch_dist
checkpoint written by ``hf_to_megatron.py`` with the backend's own loader, and records
(a) the max |log-prob difference| against transformers on packed multi-image batches,
(b) whether ``export_hf_weights`` of the TP-sharded policy reproduces the HF checkpoint exactly.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, HERE, os.path.join(ROOT, "tests", "training", "megatron")]

import torch


def main(rank: int, world: int, port: str, ckpt_dir: str, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from _megatron_fixtures import hf_reference, standard_batches, tiny_hf_model

    from care_megatron.config.schema import ParallelConfig, TrainConfig
    from care_megatron.training.megatron import checkpoint as backend_checkpoint
    from care_megatron.training.megatron.backend import MegatronBackend, MegatronBackendOptions
    from care_megatron.training.megatron.weight_export import export_hf_weights
    from checkpoints_convert import qwen2_5_vl

    hf = tiny_hf_model(tie=False)
    zeros = {name: torch.zeros_like(t) for name, t in hf.state_dict().items()}
    backend = MegatronBackend(hf.config, zeros, parallel=ParallelConfig(backend="megatron", tensor_model_parallel_size=world,
                                                                        transformer_impl="local"),
                              train=TrainConfig(lr=1e-3), dtype=torch.float32, with_reference=False,
                              options=MegatronBackendOptions(force_cpu=True), state_dict_converter=qwen2_5_vl.hf_to_megatron)
    assert all(float(p.abs().sum()) == 0.0 for p in backend.policy.parameters())
    backend_checkpoint.load_model(backend.policy, os.path.join(ckpt_dir, "release"))
    batches = standard_batches(hf)
    outputs = backend.forward_logprobs(batches)
    with torch.no_grad():
        expected = [hf_reference(hf, mb)[0] for mb in batches]
    lp_err = max(float((o.logprobs - e).abs().max()) for o, e in zip(outputs, expected))
    lp_scale = max(float(e.abs().max()) for e in expected)

    spec = qwen2_5_vl.SPEC
    reference = {spec.canonical_hf_name(n): t for n, t in hf.state_dict().items()}
    exported = {}
    for bucket in export_hf_weights(backend.policy, hf.config, bucket_bytes=64 << 10):
        exported.update(bucket)
    export_exact = sorted(exported) == sorted(reference) and all(torch.equal(exported[n], reference[n]) for n in reference)
    # The backend's own checkpoint writer (what a training run leaves behind), for megatron_to_hf.
    backend_checkpoint.save_model(backend.policy, os.path.join(ckpt_dir, "backend_saved"))
    if rank == 0:
        torch.save({"lp_err": lp_err, "lp_scale": lp_scale, "export_exact": export_exact,
                    "n_exported": len(exported), "n_reference": len(reference)}, out_path)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:])
