"""Load a script under tools/ as a module (the tools are scripts, not a package)."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_tool(name: str):
    """``tools/<name>.py`` as module ``name`` (registered in ``sys.modules`` so dataclasses and pickling work)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
