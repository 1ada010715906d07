"""tools/gpu_check.sh --dry-run: the prepared GPU call is checked on CPU before device time is spent.

The dry run prints the commands, checks that every file it names exists, that the step limits fit
the budget, and that every Python file the GPU steps run imports with only what the GPU image has
(torch, triton, transformers and their requirements) plus the wheels tools/fetch_gpu_wheels.sh pins.
"""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args, **env):
    environment = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", **env)
    environment["PYTHONPATH"] = REPO + os.pathsep + environment.get("PYTHONPATH", "")
    return subprocess.run(args, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)


def test_gpu_check_dry_run_passes():
    done = _run(["bash", "tools/gpu_check.sh", "--dry-run"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dry run: OK" in done.stdout
    for step in ("gpu_tests_megatron", "bench_train", "gpu_tests_kernels"):
        assert f"step {step} " in done.stdout
    assert "tests/training/megatron/test_megatron_gpu.py" in done.stdout  # named, not the whole tree
    assert " tests\n" not in done.stdout and not done.stdout.rstrip().endswith(" tests")
    # the GPU run exercises the megatron-core users get: 0.19.2 on the image's Python 3.12
    this_python = "0.19.2" if sys.version_info >= (3, 12) else "0.16.1"
    assert f"megatron-core: 0.19.2 on Python >= 3.12, 0.16.1 below (this Python: {this_python})" in done.stdout


def test_gpu_check_dry_run_fails_when_a_megatron_core_wheel_is_not_fetched(tmp_path):
    """The dry run checks tools/fetch_gpu_wheels.sh against the megatron-core versions it installs."""
    script = open(os.path.join(REPO, "tools/gpu_check.sh")).read().replace("MEGATRON_CORE_PY312=0.19.2",
                                                                           "MEGATRON_CORE_PY312=0.18.0")
    patched = tmp_path / "gpu_check.sh"
    patched.write_text(script.replace('cd "$(dirname "$0")/.."', f'cd "{REPO}"'))
    done = _run(["bash", str(patched), "--dry-run"])
    assert done.returncode == 1 and "does not fetch megatron-core 0.18.0" in done.stdout, done.stdout


def test_megatron_extra_brings_triton_where_it_resolves_megatron_core_0_19():
    """megatron-core 0.19's GPT model imports triton unguarded (transformer/moe/ops/paged_stash.py) and
    does not require it: [megatron] must, on Linux with Python >= 3.12, and only there."""
    import ast

    from packaging.requirements import Requirement

    tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
    extras = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                  and any(getattr(t, "id", None) == "EXTRAS" for t in node.targets))

    def resolved(python, platform="linux"):
        environment = {"python_version": python, "python_full_version": python + ".0", "sys_platform": platform,
                       "platform_system": platform.capitalize(), "extra": ""}
        requirements = [Requirement(r) for r in extras["megatron"]]
        return {r.name: r.specifier for r in requirements if r.marker is None or r.marker.evaluate(environment)}

    on_312, on_311 = resolved("3.12"), resolved("3.11")
    assert "0.19.2" in on_312["megatron-core"] and "triton" in on_312
    assert "0.19.2" not in on_311["megatron-core"] and "triton" not in on_311


def test_gpu_check_dry_run_fails_over_budget():
    done = _run(["bash", "tools/gpu_check.sh", "--dry-run"], GPU_CHECK_BUDGET_S="300")
    assert done.returncode == 1
    assert "over the 300s" in done.stdout and "dry run: FAILED" in done.stdout


def test_import_check_finds_a_module_the_image_lacks(tmp_path):
    """A file importing PIL passes only when Pillow is among the shipped wheels; one importing a
    module no distribution provides fails, and so does a function-level import of it."""
    uses_pil = tmp_path / "uses_pil.py"
    uses_pil.write_text("from PIL import Image\n")
    lazy = tmp_path / "lazy_import.py"
    lazy.write_text("def run():\n    import not_a_real_module_anywhere\n")
    with_pillow = tmp_path / "with.sh"
    with_pillow.write_text("WHEELS=(pytest==9.2.0 pillow==13.0.0)\n")
    without_pillow = tmp_path / "without.sh"
    without_pillow.write_text("WHEELS=(pytest==9.2.0)\n")
    check = [sys.executable, "tools/gpu_check_imports.py", "--wheels"]

    ok = _run(check + [str(with_pillow), str(uses_pil)])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    missing = _run(check + [str(without_pillow), str(uses_pil)])
    assert missing.returncode == 1 and "No module named 'PIL'" in missing.stdout, missing.stdout
    not_shipped = _run(check + [str(with_pillow), str(lazy)])
    assert not_shipped.returncode == 1 and "'not_a_real_module_anywhere'" in not_shipped.stdout, not_shipped.stdout
