"""Preemption on CPU: SIGUSR1 (what the sbatch scripts have Slurm send before the time limit) makes a
running ``care-train`` write a checkpoint and exit with 128 + signal; ``--resume`` continues from it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import care_megatron
from care_megatron import runtime

REPO = Path(care_megatron.__file__).resolve().parent.parent
TINY = ["model.name=tiny_qwen2_5_vl", "train.init_from=null", "data.tasks=[count_shapes]", "data.train_size=16",
        "data.eval_size=0", "data.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=6",
        "algorithm.rgr=false", "train.save_every=1000", "train.threads=1"]


def _train(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "care_megatron.cli", "train", "--no-progress", *TINY,
                             f"train.output_dir={out}", *extra], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)


def _logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def test_check_preemption_is_inert_until_installed_then_raises(monkeypatch):
    monkeypatch.setattr(runtime, "_preemption", {"installed": False, "signal": signal.SIGUSR1})
    runtime.check_preemption()  # library use (tests, notebooks) never stops on a stray flag
    previous = {s: signal.getsignal(s) for s in runtime.PREEMPTION_SIGNALS}
    try:
        monkeypatch.setattr(runtime, "_preemption", {"installed": False, "signal": 0})
        runtime.install_preemption_handlers()
        runtime.check_preemption()
        os.kill(os.getpid(), signal.SIGTERM)  # recorded, not fatal
        with pytest.raises(runtime.PreemptionRequested) as info:
            runtime.check_preemption()
        assert isinstance(info.value, KeyboardInterrupt) and info.value.signum == signal.SIGTERM
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@pytest.mark.slow
def test_sigusr1_writes_a_checkpoint_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    proc = _train(out, "train.steps=1000")
    try:
        deadline = time.monotonic() + 300
        while not _logged_steps(out):  # let at least one step finish
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no step logged in 300 s"
            time.sleep(0.5)
        proc.send_signal(signal.SIGUSR1)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGUSR1, stderr
    assert "continue with --resume" in stderr
    checkpoints = sorted((out / "checkpoints").glob("step_*"))
    assert len(checkpoints) == 1
    saved = int(checkpoints[0].name.split("_")[1])
    assert saved >= 1 and saved == _logged_steps(out)[-1]  # every finished step is in the checkpoint, no more

    resumed = _train(out, "train.steps=%d" % (saved + 1), "--resume")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert f"at step {saved}" in stderr  # trainer.resume's log line: started from the checkpoint, not from 0
    assert _logged_steps(out)[-1] == saved + 1
