"""The sbatch scripts, rendered with a simulated Slurm environment: fake ``srun`` / ``scontrol`` /
``sbatch`` on PATH record what the scripts would launch (tasks, cpus, rendezvous, output directory),
and a simulated preemption checks the USR1 -> trainers -> requeue path."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import care_megatron
from care_megatron.config import load_config

REPO = Path(care_megatron.__file__).resolve().parent.parent
SLURM = REPO / "examples" / "slurm"
SCRIPTS = sorted(SLURM.glob("*.sbatch"))
NODES = ["gpu-a01", "gpu-a02", "gpu-a03", "gpu-a04", "gpu-b01", "gpu-b02", "gpu-b03", "gpu-b04"]

FAKE_SRUN = f"""#!{sys.executable}
import json, os, signal, sys, time
record = {{"argv": sys.argv[1:], "env_cpus": os.environ.get("SRUN_CPUS_PER_TASK"), "cwd": os.getcwd()}}
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps({{"srun": record}}) + "\\n")
if os.environ.get("FAKE_SRUN_WAIT"):
    def stop(signum, frame):  # what torchrun -> trainers do: checkpoint, exit 128 + signal
        with open(os.environ["FAKE_LOG"], "a") as log:
            log.write(json.dumps({{"srun_signal": signum}}) + "\\n")
        sys.exit(128 + signum)
    signal.signal(signal.SIGUSR1, stop)
    time.sleep(60)
    sys.exit(1)
"""
FAKE_SCONTROL = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps({{"scontrol": sys.argv[1:]}}) + "\\n")
if sys.argv[1:3] == ["show", "hostnames"]:
    print("\\n".join({NODES!r}[:int(os.environ["SLURM_JOB_NUM_NODES"])]))
"""
FAKE_SBATCH = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps({{"sbatch": sys.argv[1:], "cwd": os.getcwd(), "logs_exist": os.path.isdir("logs")}}) + "\\n")
"""


def _directives(script: Path) -> dict[str, str]:
    out = {}
    for line in script.read_text().splitlines():
        match = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if match:
            out[match.group(1)] = match.group(2) or ""
    return out


@pytest.fixture
def slurm_env(tmp_path):
    """A submit directory (the repository's examples/ linked in), fake Slurm tools, a job environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("sbatch", FAKE_SBATCH)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    submit = tmp_path / "submit"
    submit.mkdir()
    (submit / "examples").symlink_to(REPO / "examples")
    log = tmp_path / "fake.log"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "FAKE_LOG": str(log),
           "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(submit), "SLURM_CPUS_PER_TASK": "96"}
    return env, submit, log


def _events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _job_env(env, script):
    d = _directives(script)
    nodes = int(d["nodes"])
    return {**env, "SLURM_JOB_NAME": d["job-name"], "SLURM_JOB_NUM_NODES": str(nodes),
            "SLURM_JOB_NODELIST": f"gpu-[a01-a0{nodes}]"}, d, nodes


def test_scripts_cover_1_2_and_8_nodes():
    assert {int(_directives(s)["nodes"]) for s in SCRIPTS} >= {1, 2, 8}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_sbatch_launch_line(script, slurm_env):
    env, submit, log = slurm_env
    job_env, d, nodes = _job_env(env, script)
    assert d["ntasks-per-node"] == "1" and d["gpus-per-node"] == "8" and "requeue" in d
    assert d["output"].startswith("logs/")
    lead = int(re.fullmatch(r"B:USR1@(\d+)", d["signal"]).group(1))
    result = subprocess.run(["bash", str(script)], env=job_env, cwd=submit, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    (srun,) = [e["srun"] for e in _events(log) if "srun" in e]
    argv = srun["argv"]
    # srun: one task per node, the cpus of the allocation passed explicitly (Slurm >= 22.05)
    assert f"--nodes={nodes}" in argv and "--ntasks-per-node=1" in argv and "--cpus-per-task=96" in argv
    assert srun["env_cpus"] == "96" and srun["cwd"] == str(submit)
    torchrun = argv[argv.index("torchrun"):]
    assert f"--nnodes={nodes}" in torchrun and "--nproc-per-node=8" in torchrun
    assert "--rdzv-backend=c10d" in torchrun and "--rdzv-endpoint=gpu-a01:29500" in torchrun
    assert "--rdzv-id=4242" in torchrun
    handled = next(a for a in torchrun if a.startswith("--signals-to-handle=")).split("=")[1].split(",")
    assert "SIGUSR1" in handled and "SIGTERM" in handled
    shutdown = int(next(a for a in torchrun if a.startswith("--shutdown-timeout=")).split("=")[1])
    assert 0 < shutdown < lead  # the checkpoint finishes before Slurm's time limit
    cli = torchrun[torchrun.index("-m"):]
    assert cli[:3] == ["-m", "care_megatron.cli", "train"] and "--resume" in cli
    out = submit / "runs" / d["job-name"]
    assert f"train.output_dir={out}" in cli and out.is_dir() and (submit / "logs").is_dir()
    config = cli[cli.index("--config") + 1]
    load_config(submit / config)  # the recipe the script names exists and validates
    # the job's own stdout file and the per-node logs land in logs/ (created before srun starts)
    assert next(a for a in argv if a.startswith("--output=")).startswith(f"--output={submit}/logs/")


def test_preemption_signal_reaches_the_trainers_and_requeues(slurm_env):
    env, submit, log = slurm_env
    script = SLURM / "care_qwen2_5_vl_7b.sbatch"
    job_env, _, _ = _job_env(env, script)
    job = subprocess.Popen(["bash", str(script)], env={**job_env, "FAKE_SRUN_WAIT": "1"}, cwd=submit,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not any("srun" in e for e in _events(log)):
            assert job.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(0.3)  # the fake srun installs its handler right after logging
        job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@... delivers to the batch shell
        stdout, stderr = job.communicate(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, stderr
    events = _events(log)
    assert {"srun_signal": signal.SIGUSR1} in events
    assert {"scontrol": ["requeue", "4242"]} in events
    assert events.index({"srun_signal": signal.SIGUSR1}) < events.index({"scontrol": ["requeue", "4242"]})
    assert "requeueing job 4242" in stdout


def test_submit_creates_the_log_directory_first(slurm_env, tmp_path):
    env, _, log = slurm_env
    clone = tmp_path / "clone"
    (clone / "examples" / "slurm").mkdir(parents=True)
    (clone / "examples" / "slurm" / "submit.sh").write_text((SLURM / "submit.sh").read_text())
    result = subprocess.run(["bash", str(clone / "examples" / "slurm" / "submit.sh"), "examples/slurm/x.sbatch"],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    (call,) = [e for e in _events(log) if "sbatch" in e]
    assert call == {"sbatch": ["examples/slurm/x.sbatch"], "cwd": str(clone), "logs_exist": True}
