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
