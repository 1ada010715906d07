"""Can the GPU check's Python files import on the GPU image? (run by ``tools/gpu_check.sh --dry-run``)

The GPU image brings Python 3.12, torch, triton and transformers (with their own requirements) and
nothing else, and it has no package index: everything else must travel as a wheel listed in
``tools/fetch_gpu_wheels.sh``. This script imports every named file with every other top-level
module hidden, so a module-level import that would abort the GPU run (pytest collection included)
fails here, on CPU, first. Imports written inside functions of the named files are checked
statically as well (the GPU steps execute those bodies).

Usage: ``python tools/gpu_check_imports.py --wheels tools/fetch_gpu_wheels.sh FILE...``
Exit status 0 when every file imports; otherwise each failure is printed with the missing module.
"""
from __future__ import annotations

import argparse
import ast
import importlib.abc
import importlib.metadata
import importlib.util
import os
import re
import sys
import traceback

IMAGE_DISTRIBUTIONS = ("torch", "triton", "transformers")
"""What the GPU image has installed; their required dependencies come with them."""
IMAGE_PYTHON = "3.12"
FIRST_PARTY = ("care_megatron", "checkpoints_convert")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEEL_PIN = re.compile(r"\b([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][A-Za-z0-9.+!-]*)")


def shipped_distributions(wheel_script: str) -> list[str]:
    """``NAME==VERSION`` pins in the wheel-fetching script: the distributions that travel as wheels."""
    with open(wheel_script) as f:
        return [name for name, _ in WHEEL_PIN.findall(f.read())]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _required(distribution: str) -> list[str]:
    """Unconditional requirements of an installed distribution on Linux / CPython 3.12 (no extras)."""
    try:
        requirements = importlib.metadata.requires(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return []
    names = []
    for requirement in requirements:
        spec, _, marker = requirement.partition(";")
        if marker and not _marker_holds(marker):
            continue
        names.append(re.split(r"[\s<>=!~\[(;]", spec.strip(), maxsplit=1)[0])
    return names


def _marker_holds(marker: str) -> bool:
    """Markers the requirements above use, evaluated for the image (no extras, Linux, CPython 3.12)."""
    from packaging.markers import Marker  # packaging comes with transformers on the image too

    return Marker(marker.strip()).evaluate({"python_version": IMAGE_PYTHON, "python_full_version": IMAGE_PYTHON + ".0",
                                            "sys_platform": "linux", "platform_system": "Linux",
                                            "platform_machine": "x86_64", "implementation_name": "cpython",
                                            "platform_python_implementation": "CPython", "os_name": "posix",
                                            "extra": ""})


def dependency_closure(roots) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = _canonical(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_required(name))
    return seen


def allowed_top_level(distributions: set[str]) -> set[str]:
    """Top-level import names provided by the given distributions, plus the standard library."""
    allowed = set(sys.stdlib_module_names) | {"__main__"}
    for module, owners in importlib.metadata.packages_distributions().items():
        if any(_canonical(owner) in distributions for owner in owners):
            allowed.add(module)
    return allowed


class HidingFinder(importlib.abc.MetaPathFinder):
    """Wraps an import finder: top-level names outside ``allowed`` (and outside the repository) are
    not found, exactly as if their distribution were not installed (``find_spec`` returns None)."""

    def __init__(self, inner, allowed: set[str], hidden: set[str], distributions: set[str] = frozenset()):
        self.inner, self.allowed, self.hidden, self.distributions = inner, allowed, hidden, distributions

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        spec = self.inner.find_spec(fullname, path, target) if hasattr(self.inner, "find_spec") else None
        if spec is None or top in self.allowed or top.startswith("_sysconfigdata"):  # stdlib's platform data
            return spec
        origin = getattr(spec, "origin", None) or ""
        locations = list(getattr(spec, "submodule_search_locations", None) or [])
        if any(_in_repository(p) for p in [origin, *locations] if p):
            return spec  # the project's own modules and test helpers
        if any(_installed_under(p) in self.allowed for p in [origin, *locations] if p):
            return spec  # vendored inside an allowed package (setuptools/_vendor/jaraco)
        self.hidden.add(top)
        return None

    def find_distributions(self, *args, **kwargs):
        """Metadata (importlib.metadata) of the image's and the shipped distributions only:
        transformers checks its requirements' versions, torch probes optional packages by metadata."""
        finder = getattr(self.inner, "find_distributions", None)
        if finder is None:
            return iter(())
        return (d for d in finder(*args, **kwargs) if _canonical(d.metadata["Name"] or "") in self.distributions)

    def invalidate_caches(self):
        if hasattr(self.inner, "invalidate_caches"):
            self.inner.invalidate_caches()


def _in_repository(path: str) -> bool:
    """Inside the checkout but not an installed package: a virtual environment kept in the
    checkout (``.venv/``, as CI and the README make it) holds packages the GPU image lacks."""
    return os.path.abspath(path).startswith(REPO + os.sep) and not _installed_under(path)


def _installed_under(path: str) -> str:
    """The top-level package a file or folder under site-packages belongs to ('' elsewhere)."""
    parts = os.path.abspath(path).split(os.sep)
    for index, part in enumerate(parts[:-1]):
        if part in ("site-packages", "dist-packages"):
            return parts[index + 1].removesuffix(".py")
    return ""


def function_level_imports(path: str) -> list[tuple[int, str]]:
    """(line, module) of imports inside function bodies of a file (not module-level ones, which
    importing the file checks; ``pytest.importorskip`` targets are skips, not failures)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = []
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.Import):
                found += [(node.lineno, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.append((node.lineno, node.module))
    return found


def _import_file(path: str) -> None:
    """Import a test or tool file the way pytest's default ``prepend`` mode does (its folder first on
    sys.path, conftest.py files of its folder and the folders above it inside tests/ first)."""
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:
        sys.path.insert(0, folder)
    conftests = []
    here = folder
    while here.startswith(os.path.join(REPO, "tests")):
        if os.path.exists(os.path.join(here, "conftest.py")):
            conftests.insert(0, os.path.join(here, "conftest.py"))
        here = os.path.dirname(here)
    for index, file in enumerate(conftests + [path]):
        name = f"_gpu_check_conftest_{index}_{abs(hash(file))}" if file != path else \
            os.path.splitext(os.path.basename(path))[0] + "_gpu_check"
        if name in sys.modules:
            continue
        if os.path.dirname(file) not in sys.path:
            sys.path.insert(0, os.path.dirname(file))
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


def pytest_skip_type() -> type:
    """pytest's Skipped (a BaseException raised by a failed module-level importorskip), if pytest imports."""
    try:
        from _pytest.outcomes import Skipped
    except ImportError:
        return Exception
    return Skipped


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", required=True, help="the wheel-fetching script (its NAME==VERSION pins)")
    parser.add_argument("files", nargs="+", help="test files and tools the GPU check runs")
    args = parser.parse_args(argv)
    shipped = shipped_distributions(args.wheels)
    distributions = dependency_closure([*IMAGE_DISTRIBUTIONS, *shipped])
    allowed = allowed_top_level(distributions)
    hidden: set[str] = set()
    sys.meta_path[:] = [HidingFinder(f, allowed, hidden, distributions) for f in sys.meta_path]
    sys.path.insert(0, REPO)
    failures = []
    for path in args.files:
        try:
            _import_file(path)
        except (Exception, pytest_skip_type()) as error:  # report every file (a module-level skip too)
            failures.append(f"{path}: import fails on the GPU image: {type(error).__name__}: {error}\n"
                            + "".join(traceback.format_exception(error)[-3:]))
            continue
        for line, module in function_level_imports(path):
            top = module.partition(".")[0]
            if top in FIRST_PARTY:  # the project's own module: import it, with what it imports in turn
                try:
                    importlib.import_module(module)
                except Exception as error:
                    failures.append(f"{path}:{line}: import {module} fails on the GPU image: {type(error).__name__}: {error}")
                continue
            if top in allowed or importlib.util.find_spec(top) is not None:
                continue
            failures.append(f"{path}:{line}: imports {top!r}, which is neither on the GPU image nor shipped")
    print(f"GPU image distributions + shipped wheels ({', '.join(shipped)}): {len(distributions)} distributions")
    if hidden:
        print("not available on the GPU image (looked for, hidden here): " + ", ".join(sorted(hidden)))
    for failure in failures:
        print("FAIL " + failure)
    print(f"{len(args.files) - len({f.split(':')[0] for f in failures})}/{len(args.files)} files import on the GPU image")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
