#!/usr/bin/env python
"""Extract the parts of SGLang's API the rollout adapter calls from SGLang wheels, without importing them.

SGLang cannot be imported without a CUDA build, so the conformance test of the SGLang fake
(``tests/rollout/test_sglang_conformance.py``) checks against this table instead. It reads each
wheel's source with ``ast``:

* ``engines``: every public method of ``sglang.Engine`` (``srt/entrypoints/engine.py``) with its
  parameter names, which have defaults, and whether it takes ``**kwargs``;
* ``server_args``: the keyword arguments ``Engine(**kwargs)`` forwards to ``ServerArgs`` (the
  ``ServerArgs`` dataclass fields of ``srt/server_args.py`` up to 0.5.x, plus the fields of the
  namespace classes of ``srt/arg_groups/fields/*.py`` that later versions assemble it from);
* ``sampling_params``: the keys of a request's ``sampling_params`` dict (``SamplingParams.__init__``
  arguments, or its struct fields where it is a ``msgspec.Struct``);
* ``memory_tags``: the ``GPU_MEMORY_TYPE_*`` tags of ``srt/constants.py``;
* ``weight_update_session_required``: whether the scheduler's ``update_weights_from_tensor`` refuses
  to run outside ``begin_weight_update`` / ``end_weight_update`` (a ``self._session is None`` test,
  ``srt/managers/**``);
* ``image_resize``: SGLang's own Qwen-VL image resize before the processor (``factor``,
  ``min_pixels``, ``max_pixels`` of ``srt/multimodal/processors/qwen_vl.py`` where it defines
  ``resize_image``), or null where the processor alone decides;
* ``environment``: the variables ``Engine`` writes into the caller's process (``engine_writes``:
  ``os.environ[...]`` assignments and ``setdefault`` calls of ``_set_envs_and_config``) and, for each
  variable the adapter sets or checks (``ADAPTER_ENV``), the files that name it (``reads``).

Regenerate the committed table after changing the pinned versions::

    pip download --no-deps sglang==0.5.3 --python-version 3.12 --only-binary=:all: -d /tmp/sgl053
    pip download --no-deps sglang==0.5.23 --python-version 3.12 --only-binary=:all: -d /tmp/sgl0523
    python tools/extract_sglang_signatures.py /tmp/sgl053/sglang-0.5.3-*.whl /tmp/sgl0523/sglang-0.5.23-*.whl \
        -o tests/rollout/sglang_signatures.json
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import zipfile
from pathlib import Path

ENGINE_FILE = "sglang/srt/entrypoints/engine.py"
SERVER_ARGS_FILE = "sglang/srt/server_args.py"
ARG_FIELDS_DIR = "sglang/srt/arg_groups/fields/"
SAMPLING_FILE = "sglang/srt/sampling/sampling_params.py"
CONSTANTS_FILE = "sglang/srt/constants.py"
QWEN_VL_PROCESSOR_FILE = "sglang/srt/multimodal/processors/qwen_vl.py"
MANAGERS_DIR = "sglang/srt/managers/"
ADAPTER_ENV = ("SGLANG_VLM_CACHE_SIZE_MB", "SGLANG_RETURN_ORIGINAL_LOGPROB", "RETURN_ORIGINAL_LOGPROB")
"""Variables ``care_megatron.rollout.sglang_engine`` sets for, or checks before, an engine start."""


def _class(tree: ast.Module, name: str) -> ast.ClassDef | None:
    return next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)


def _annotated_fields(cls: ast.ClassDef) -> list[str]:
    """Names of ``name: type [= default]`` class-body fields, private and ClassVar ones left out."""
    out = []
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if node.target.id.startswith("_") or "ClassVar" in ast.unparse(node.annotation):
                continue
            out.append(node.target.id)
    return out


def _signature(fn: ast.FunctionDef) -> dict:
    args = fn.args
    positional = args.posonlyargs + args.args
    with_default = {a.arg for a in positional[len(positional) - len(args.defaults):]} if args.defaults else set()
    params = [{"name": a.arg, "default": a.arg in with_default} for a in positional if a.arg != "self"]
    params += [{"name": a.arg, "default": d is not None} for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    return {"params": params, "var_keyword": args.kwarg is not None}


def engine_methods(source: str) -> dict:
    cls = _class(ast.parse(source), "Engine")
    if cls is None:
        raise ValueError(f"no class Engine in {ENGINE_FILE}")
    return {fn.name: _signature(fn) for fn in cls.body
            if isinstance(fn, ast.FunctionDef) and (not fn.name.startswith("_") or fn.name == "__init__")}


def server_args_fields(files: dict[str, str]) -> list[str]:
    fields = []
    cls = _class(ast.parse(files[SERVER_ARGS_FILE]), "ServerArgs")
    if cls is not None:
        fields += _annotated_fields(cls)
    for path in sorted(p for p in files if p.startswith(ARG_FIELDS_DIR)):
        for node in ast.parse(files[path]).body:
            is_namespace = isinstance(node, ast.ClassDef) and any(
                isinstance(s, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_NS_PATH" for t in s.targets)
                for s in node.body)
            if is_namespace:
                fields += _annotated_fields(node)
    return sorted(set(fields))


def sampling_param_keys(source: str) -> list[str]:
    cls = _class(ast.parse(source), "SamplingParams")
    if cls is None:
        raise ValueError(f"no class SamplingParams in {SAMPLING_FILE}")
    init = next((fn for fn in cls.body if isinstance(fn, ast.FunctionDef) and fn.name == "__init__"), None)
    if init is not None:
        return sorted(p["name"] for p in _signature(init)["params"])
    return sorted(_annotated_fields(cls))


def memory_tags(source: str) -> dict[str, str]:
    tags = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id.startswith("GPU_MEMORY_TYPE_"):
                    tags[target.id] = node.value.value
    return tags


def weight_update_session_required(files: dict[str, str]) -> bool:
    """True when some ``update_weights_from_tensor`` under ``srt/managers`` returns early on
    ``self._session is None`` (0.5.23's ``SchedulerWeightUpdaterManager``)."""
    for path in (p for p in files if p.startswith(MANAGERS_DIR)):
        for fn in ast.walk(ast.parse(files[path])):
            if isinstance(fn, ast.FunctionDef) and fn.name == "update_weights_from_tensor":
                if any(isinstance(n, ast.If) and ast.unparse(n.test) == "self._session is None" for n in ast.walk(fn)):
                    return True
    return False


def _constant_value(node: ast.AST, names: dict[str, int]) -> int | None:
    """Value of an integer expression of literals, known names, ``+ - * //`` (None otherwise)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv)):
        left, right = _constant_value(node.left, names), _constant_value(node.right, names)
        if left is None or right is None:
            return None
        return {ast.Add: left + right, ast.Sub: left - right, ast.Mult: left * right,
                ast.FloorDiv: left // right if right else None}[type(node.op)]
    return None


def image_resize(source: str | None) -> dict | None:
    """SGLang's own Qwen-VL image resize rule, where ``qwen_vl.py`` defines ``resize_image``."""
    if source is None:
        return None
    tree = ast.parse(source)
    if not any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == "resize_image" for n in tree.body):
        return None
    names: dict[str, int] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = _constant_value(node.value, names)
            if value is not None:
                names[node.targets[0].id] = value
    rule = {"factor": names.get("IMAGE_FACTOR"), "min_pixels": names.get("MIN_PIXELS"), "max_pixels": names.get("MAX_PIXELS")}
    if None in rule.values():
        raise ValueError(f"{QWEN_VL_PROCESSOR_FILE} defines resize_image but not constant IMAGE_FACTOR / MIN_PIXELS / MAX_PIXELS")
    return rule


def environment(files: dict[str, str]) -> dict:
    """``engine_writes``: what ``_set_envs_and_config`` writes into ``os.environ``; ``reads``: the
    files naming each ``ADAPTER_ENV`` variable (as a word: a string literal or an ``envs`` field)."""
    writes = set()
    for fn in ast.walk(ast.parse(files[ENGINE_FILE])):
        if isinstance(fn, ast.FunctionDef) and fn.name == "_set_envs_and_config":
            for node in ast.walk(fn):
                if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store) \
                        and ast.unparse(node.value) == "os.environ" and isinstance(node.slice, ast.Constant):
                    writes.add(node.slice.value)
                if isinstance(node, ast.Call) and ast.unparse(node.func) == "os.environ.setdefault" \
                        and node.args and isinstance(node.args[0], ast.Constant):
                    writes.add(node.args[0].value)
    reads = {name: sorted(path for path, source in files.items() if re.search(rf"\b{name}\b", source))
             for name in ADAPTER_ENV}
    return {"engine_writes": sorted(writes), "reads": reads}


def wheel_version(wheel: zipfile.ZipFile) -> str:
    meta = next(n for n in wheel.namelist() if re.fullmatch(r"sglang-[^/]+\.dist-info/METADATA", n))
    match = re.search(r"^Version: (\S+)$", wheel.read(meta).decode(), re.M)
    if match is None:
        raise ValueError(f"no Version in {meta}")
    return match.group(1)


def extract(wheel_path: str) -> tuple[str, dict]:
    with zipfile.ZipFile(wheel_path) as wheel:
        files = {n: wheel.read(n).decode("utf-8-sig") for n in wheel.namelist()
                 if n.startswith("sglang/srt/") and n.endswith(".py")}
        version = wheel_version(wheel)
    return version, {
        "wheel": Path(wheel_path).name,
        "engine_methods": engine_methods(files[ENGINE_FILE]),
        "server_args": server_args_fields(files),
        "sampling_params": sampling_param_keys(files[SAMPLING_FILE]),
        "memory_tags": memory_tags(files[CONSTANTS_FILE]),
        "weight_update_session_required": weight_update_session_required(files),
        "image_resize": image_resize(files.get(QWEN_VL_PROCESSOR_FILE)),
        "environment": environment(files),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("wheels", nargs="+", help="sglang-*.whl files")
    parser.add_argument("-o", "--output", required=True, help="JSON table to write")
    args = parser.parse_args(argv)
    table = {"generated_by": "tools/extract_sglang_signatures.py", "versions": {}}
    for path in args.wheels:
        version, entry = extract(path)
        table["versions"][version] = entry
        print(f"{version}: {len(entry['engine_methods'])} Engine methods, {len(entry['server_args'])} ServerArgs "
              f"fields, {len(entry['sampling_params'])} sampling params, tags {sorted(entry['memory_tags'].values())}, "
              f"session required {entry['weight_update_session_required']}, own image resize {entry['image_resize']}")
    Path(args.output).write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
