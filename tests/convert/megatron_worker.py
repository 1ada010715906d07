"""Run in a fresh process by the tests: needs a gloo world of one and Megatron's parallel state.

    python megatron_worker.py names OUT.json [HF_DIR CKPT HF_OUT TP]...  # GPTModel names/shapes vs the mapping,
                                                                         # then torch_dist round trips
    python megatron_worker.py convert [HF_DIR CKPT HF_OUT TP]...         # torch_dist round trips only
    python megatron_worker.py backend_fixture HF_DIR CKPT TP             # the backend tests' tiny model
    python megatron_worker.py to_hf CKPT HF_CONFIG_DIR OUT                # megatron_to_hf CLI, backend-saved ckpt
    python megatron_worker.py release_019 HF_DIR CKPT HF_OUT REFUSAL_TXT  # saved as megatron-core 0.19 saves,
                                                                         # read back; then without common.pt
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def names(out_path):
    import torch

    from care_megatron.models.weight_mapping import dims_from_config, get_mapping, hf_to_megatron_state_dicts, padded_vocab_size
    from checkpoints_convert.megatron_io import build_template_gpt
    from tiny_models import build_model

    report = {}
    for arch, tie in [("qwen2", False), ("qwen3", True), ("qwen2_5_vl", True), ("qwen3_vl", False)]:
        model = build_model(arch, tie=tie)
        spec = get_mapping(arch)
        dims = dims_from_config(spec, model.config)
        ours = hf_to_megatron_state_dicts(model.state_dict(), model.config, tp=1, pp=1)[(0, 0)]
        ours = {k: list(v.shape) for k, v in ours.items() if not k.startswith("vision_model.")}
        gpt = build_template_gpt(dims, padded_vocab_size(dims.vocab_size, 1))
        theirs = {k: list(v.shape) for k, v in gpt.state_dict().items() if torch.is_tensor(v)}
        report[f"{arch}_{tie}"] = {"ours": ours, "megatron": theirs}
    with open(out_path, "w") as handle:
        json.dump(report, handle)


def convert(hf_dir, ckpt, hf_out, tp):
    from checkpoints_convert.hf_to_megatron import convert_hf_to_megatron
    from checkpoints_convert.megatron_to_hf import convert_megatron_to_hf

    convert_hf_to_megatron(hf_dir, ckpt, tp=int(tp), pp=1, show_progress=False)
    convert_megatron_to_hf(ckpt, hf_out, max_shard_bytes=100_000, show_progress=False)


def backend_fixture_checkpoint(hf_dir, ckpt, tp):
    """Save the Megatron backend's tiny Qwen2.5-VL fixture as an HF dir and convert it (torch_dist)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training", "megatron"))
    from _megatron_fixtures import tiny_hf_model

    from checkpoints_convert.hf_to_megatron import convert_hf_to_megatron

    tiny_hf_model(tie=False).save_pretrained(hf_dir)
    convert_hf_to_megatron(hf_dir, ckpt, tp=int(tp), show_progress=False)


def convert_saved_as_release_019(hf_dir, ckpt, hf_out, refusal_txt):
    """hf_to_megatron with megatron-core 0.19's save (no ``common.pt`` from the release), megatron_to_hf
    with the installed 0.16.1; then the same read without ``common.pt``, its error written out."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training", "megatron"))
    import _megatron_release_019 as release_019

    from checkpoints_convert.hf_to_megatron import convert_hf_to_megatron
    from checkpoints_convert.megatron_to_hf import convert_megatron_to_hf

    with release_019.saving_like_release_019():
        convert_hf_to_megatron(hf_dir, ckpt, tp=1, pp=1, show_progress=False)
    convert_megatron_to_hf(ckpt, hf_out, show_progress=False)
    os.remove(os.path.join(ckpt, "release", "common.pt"))
    try:
        convert_megatron_to_hf(ckpt, hf_out + "_refused", show_progress=False)
        message = "no error"
    except RuntimeError as error:
        message = str(error)
    with open(refusal_txt, "w") as handle:
        handle.write(message)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "names":
        names(args[0])
        args = args[1:]
        for i in range(0, len(args), 4):
            convert(*args[i:i + 4])
    elif command == "to_hf":
        from checkpoints_convert.megatron_to_hf import main as to_hf_main

        sys.exit(to_hf_main(["--ckpt", args[0], "--hf-config", args[1], "--out", args[2], "--no-progress"]))
    elif command == "backend_fixture":
        backend_fixture_checkpoint(*args)
    elif command == "release_019":
        convert_saved_as_release_019(*args)
    else:
        for i in range(0, len(args), 4):
            convert(*args[i:i + 4])
