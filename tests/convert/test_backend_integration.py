"""The converter's torch_dist checkpoint in the Megatron backend (TP=2, gloo): same log-probs as
transformers, the weight export of the TP-sharded backend policy reproduces the HF weights, and the
backend's own saved checkpoint converts back to the HF weights bit-exactly."""
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("megatron.core")
FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "training", "megatron", "_megatron_fixtures.py")
HERE = os.path.dirname(__file__)


def _port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


@pytest.mark.distributed
@pytest.mark.skipif(not os.path.exists(FIXTURES), reason="Megatron backend test fixtures not present")
def test_tp2_checkpoint_in_megatron_backend_matches_hf(tmp_path):
    hf_dir, ckpt = str(tmp_path / "hf"), str(tmp_path / "mg")
    result = subprocess.run([sys.executable, os.path.join(HERE, "megatron_worker.py"), "backend_fixture", hf_dir, ckpt,
                             "2"], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    out, port = str(tmp_path / "result.pt"), _port()
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "backend_worker.py"), str(rank), "2", port, ckpt, out],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-4000:]
    measured = torch.load(out)
    print("backend integration:", measured)
    assert measured["lp_scale"] > 1.0, measured  # log-probs far from 0: the tolerance is meaningful
    assert measured["lp_err"] < 1e-5, measured
    assert measured["export_exact"], measured
    # A checkpoint written by the backend's own saver (TP=2) converts back to the original HF weights.
    result = subprocess.run([sys.executable, os.path.join(HERE, "megatron_worker.py"), "to_hf",
                             os.path.join(ckpt, "backend_saved"), hf_dir, str(tmp_path / "hf_back")],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    original, back = load_file(os.path.join(hf_dir, "model.safetensors")), load_file(tmp_path / "hf_back" / "model.safetensors")
    assert sorted(original) == sorted(back)
    assert all(torch.equal(original[k], back[k]) for k in original)
