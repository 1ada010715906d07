"""Fixtures of the conversion tests: tiny random models saved once per session."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from tiny_models import save_model  # noqa: E402

ARCH_VARIANTS = [("qwen2", False), ("qwen3", False), ("qwen2_5_vl", False), ("qwen2_5_vl", True), ("qwen3_vl", False)]


@pytest.fixture(scope="session")
def saved_model_dirs(tmp_path_factory):
    """{(arch, tied): directory written by save_pretrained} for every variant, built lazily."""
    cache = {}

    def get(arch: str, tie: bool = False) -> str:
        if (arch, tie) not in cache:
            directory = str(tmp_path_factory.mktemp(f"{arch}_{'tied' if tie else 'untied'}"))
            cache[(arch, tie)] = save_model(arch, directory, tie=tie)
        return cache[(arch, tie)]

    return get
