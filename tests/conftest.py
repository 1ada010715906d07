"""Shared test set-up: deterministic CPU runs, GPU tests skipped without a GPU, extended layouts on request."""
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--extended", action="store_true", default=False,
                     help="also run tests marked extended (heavier parallel layouts; about 10 more minutes on 2 cores)")


def _extended_enabled(config) -> bool:
    return bool(config.getoption("--extended")) or os.environ.get("CARE_EXTENDED_TESTS", "") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    if not _extended_enabled(config):
        skip_extended = pytest.mark.skip(reason="extended layout: run with --extended (or CARE_EXTENDED_TESTS=1)")
        for item in items:
            if item.get_closest_marker("extended") is not None:
                item.add_marker(skip_extended)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `in keywords`: a checkout folder named gpu matches that
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
