"""Kernel tests: switch Triton's interpreter on for CPU runs, when it is still possible.

Triton fixes interpreted-vs-compiled for its own language helpers at import time. If nothing has
imported triton yet (true when this folder runs alone), setting TRITON_INTERPRET here is enough;
otherwise (megatron.core imports triton) the interpreter tests are re-run in a fresh process by
``test_interpreter_in_fresh_process`` instead.
"""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

from care_megatron.kernels import interpreter_active  # noqa: E402


@pytest.fixture
def triton_interpreter():
    """Skip unless Triton kernels can run here: on a GPU, or interpreted on CPU."""
    if torch.cuda.is_available():
        pytest.skip("GPU present: the gpu-marked tests cover the compiled kernels")
    if not interpreter_active():
        pytest.skip("triton was imported before TRITON_INTERPRET could be set; "
                    "test_interpreter_in_fresh_process runs these tests in a fresh process")
    yield
