"""Re-run the Triton-interpreter tests in a fresh process when this one imported triton too early.

Triton decides interpreted-vs-compiled for its language helpers at import time; in a full-suite
run megatron.core may import it before tests/kernels/conftest.py can set TRITON_INTERPRET=1, and
the in-process interpreter tests then skip. This test makes sure they still run.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from care_megatron.kernels import interpreter_active


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU present: compiled kernels are tested instead")
def test_interpreter_in_fresh_process():
    if interpreter_active():
        pytest.skip("the interpreter is active in this process: the triton tests already ran here")
    here = Path(__file__).parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton",
         str(here / "test_logprobs.py"), str(here / "test_region_loss.py")],
        env=env, capture_output=True, text=True, timeout=300, cwd=here.parent.parent,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
