"""tools/bench_train.py prints each contender's row when it is measured; out of memory is a row."""
import importlib.util
import os
import types

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def bench_train():
    spec = importlib.util.spec_from_file_location("bench_train_under_test", os.path.join(REPO, "tools", "bench_train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_are_reported_as_measured_and_oom_is_a_row(bench_train):
    args = types.SimpleNamespace(tokens=8192)
    printed = []

    def fast(_args):
        assert printed == [], "the first contender must not wait for anything"
        return {"name": "megatron", "seconds": 0.5, "peak_gib": 30.0}

    def out_of_memory(_args):
        assert [r["name"] for r in printed] == ["megatron"], "the first row is out before the second runs"
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.64 GiB\nmore detail")

    def after(_args):
        return {"name": "third", "seconds": 2.0, "peak_gib": 1.0}

    rows = bench_train.measure_rows([("megatron", fast), ("transformers", out_of_memory), ("third", after)], args,
                                    flops=4e15, peak=1e15, on_row=printed.append)
    assert rows == printed
    assert rows[0]["tokens_per_s"] == 8192 / 0.5 and rows[0]["tflops"] == 4e15 / 0.5 / 1e12 and rows[0]["mfu"] == 8.0
    assert rows[1] == {"name": "transformers", "error": "out of memory: CUDA out of memory. Tried to allocate 4.64 GiB"}
    assert rows[2]["tokens_per_s"] == 4096
    assert "out of memory" in bench_train.format_row(rows[1]) and "16384" in bench_train.format_row(rows[0])


def test_other_errors_are_not_swallowed(bench_train):
    def broken(_args):
        raise ValueError("a real bug")

    with pytest.raises(ValueError, match="a real bug"):
        bench_train.measure_rows([("broken", broken)], types.SimpleNamespace(tokens=1), 1.0, 1.0, lambda row: None)
