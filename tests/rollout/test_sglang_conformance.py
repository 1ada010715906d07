"""The SGLang fake against the real ``sglang.Engine`` API of the pinned versions.

SGLang cannot be imported here (it needs a CUDA build), so the reference is ``sglang_signatures.json``,
extracted from the 0.5.3 and 0.5.23 wheels by ``tools/extract_sglang_signatures.py`` (regenerated,
not hand-written). A fake method or keyword SGLang does not have, a start-up argument that is no
``ServerArgs`` field, a sampling key SGLang does not read, or a memory tag it does not know fails here.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import zipfile
from pathlib import Path

import pytest

from care_megatron.rollout import sglang_engine as se
from care_megatron.rollout.base import MEMORY_TAGS, SamplingParams
from sglang_fakes import FAKED_VERSIONS, SIGNATURES, fake_api, fake_engine_class

ROOT = Path(__file__).resolve().parents[2]


def fake_methods(version):
    return {name: fn for name, fn in inspect.getmembers(fake_engine_class(version), inspect.isfunction)
            if not name.startswith("_") or name == "__init__"}


def test_table_covers_the_supported_range():
    from packaging.version import Version

    versions = [Version(v) for v in FAKED_VERSIONS]
    assert min(versions) == Version("0.5.3")  # the floor of SUPPORTED_SGLANG
    for version in FAKED_VERSIONS:
        se.check_sglang_version(version)
        assert SIGNATURES[version]["wheel"].startswith(f"sglang-{version}-")


@pytest.mark.parametrize("version", FAKED_VERSIONS)
def test_fake_methods_and_keywords_are_a_subset_of_the_real_engine(version):
    real = SIGNATURES[version]["engine_methods"]
    for name, fn in fake_methods(version).items():
        if name == "__init__":
            continue  # Engine(**kwargs) -> ServerArgs: checked field by field below
        assert name in real, f"FakeEngine.{name} does not exist on sglang {version}'s Engine"
        params = list(inspect.signature(fn).parameters.values())[1:]
        real_names = {p["name"] for p in real[name]["params"]}
        for p in params:
            assert p.name in real_names or real[name]["var_keyword"], \
                f"FakeEngine.{name}({p.name}=...) is not a parameter of sglang {version}'s Engine.{name}"
        fake_names = {p.name for p in params}
        required = {p["name"] for p in real[name]["params"] if not p["default"]}
        assert required <= fake_names, f"sglang {version}'s Engine.{name} requires {required - fake_names}"
        for p in params:  # what the real one defaults, the fake defaults too (callers may omit it)
            real_default = next((q["default"] for q in real[name]["params"] if q["name"] == p.name), True)
            assert real_default == (p.default is not inspect.Parameter.empty), f"{name}({p.name}) default"


@pytest.mark.parametrize("version", FAKED_VERSIONS)
def test_start_arguments_are_server_args_fields(version):
    config = se.SGLangEngineConfig(model_path="m", tp_size=2, base_gpu_id=2, nccl_port=21100, context_length=512,
                                   image_min_pixels=3136, image_max_pixels=12845056)
    fields = set(SIGNATURES[version]["server_args"])
    args = config.engine_args(fake_api(version))
    assert set(args) <= fields
    assert ("mm_process_config" in args) == (version != "0.5.3")  # 0.5.3 has no such field
    assert {"enable_weights_cpu_backup", "enable_memory_saver"} <= fields  # what the memory plan relies on


@pytest.mark.parametrize("version", FAKED_VERSIONS)
def test_sampling_keys_are_read_by_sglang(version):
    keys = set(se.sglang_sampling_params(SamplingParams(top_k=5, stop_token_ids=[3])))
    assert keys | {"sampling_seed"} <= set(SIGNATURES[version]["sampling_params"])


@pytest.mark.parametrize("version", FAKED_VERSIONS)
def test_memory_tags_are_sglangs(version):
    engine = se.SGLangRolloutEngine(se.SGLangEngineConfig(model_path="m", context_length=512), api=fake_api(version))
    sent = set(engine.sglang_memory_tags(MEMORY_TAGS))
    assert sent == set(SIGNATURES[version]["memory_tags"].values())  # every tag of the version, no other


def test_extractor_reads_a_wheel(tmp_path):
    """The table is what the tool extracts: run it on a minimal wheel of the same layout."""
    spec = importlib.util.spec_from_file_location("extract_sglang_signatures", ROOT / "tools" / "extract_sglang_signatures.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    wheel = tmp_path / "sglang-9.9.9-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("sglang-9.9.9.dist-info/METADATA", "Metadata-Version: 2.1\nName: sglang\nVersion: 9.9.9\n")
        zf.writestr(tool.ENGINE_FILE, "class Engine:\n    def __init__(self, **kwargs): ...\n"
                                      "    def generate(self, prompt=None, *, n: int, rid=None): ...\n"
                                      "    def _private(self): ...\n")
        zf.writestr(tool.SERVER_ARGS_FILE, "class ServerArgs:\n    model_path: str\n    tp_size: int = 1\n    _x: int = 0\n")
        zf.writestr(tool.ARG_FIELDS_DIR + "parallel.py", "class Parallel:\n    _NS_PATH = 'parallel'\n    nccl_port: int = 0\n"
                                                         "class Helper:\n    not_a_field: int = 0\n")
        zf.writestr(tool.SAMPLING_FILE, "class SamplingParams:\n    temperature: float = 1.0\n    top_p: float = 1.0\n")
        zf.writestr(tool.CONSTANTS_FILE, "GPU_MEMORY_TYPE_WEIGHTS = 'weights'\nOTHER = 'x'\n")
    out = tmp_path / "table.json"
    assert tool.main([str(wheel), "-o", str(out)]) == 0
    entry = json.loads(out.read_text())["versions"]["9.9.9"]
    assert entry["engine_methods"] == {
        "__init__": {"params": [], "var_keyword": True},
        "generate": {"params": [{"name": "prompt", "default": True}, {"name": "n", "default": False},
                                {"name": "rid", "default": True}], "var_keyword": False}}
    assert entry["server_args"] == ["model_path", "nccl_port", "tp_size"]
    assert entry["sampling_params"] == ["temperature", "top_p"]
    assert entry["memory_tags"] == {"GPU_MEMORY_TYPE_WEIGHTS": "weights"}
