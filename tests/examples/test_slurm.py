"""The sbatch scripts, rendered with a simulated Slurm environment: fake ``srun`` / ``scontrol`` /
``sbatch`` on PATH record what the scripts would launch (tasks, cpus, rendezvous, output directory),
and a simulated preemption checks the USR1 -> trainers -> requeue path (RL, and cold-start SFT jobs,
``sft_*.sbatch``, whose care-sft checkpoints and resumes the same way); an SFT job's output is the RL
recipes' ``train.init_from``."""
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
SFT_SCRIPTS = [s for s in SCRIPTS if s.name.startswith("sft_")]
RL_SCRIPTS = [s for s in SCRIPTS if s not in SFT_SCRIPTS]
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


def test_every_model_has_an_sft_script():
    assert sorted(s.name for s in SFT_SCRIPTS) == ["sft_qwen2_5_vl_3b.sbatch", "sft_qwen2_5_vl_7b.sbatch",
                                                   "sft_qwen3_vl_8b.sbatch"]


def _launch(script, slurm_env):
    """Run ``script`` under the fake Slurm tools: ``(directives, nodes, srun argv, care_megatron.cli argv)``
    after the checks every script shares (one task per node, cpus, rendezvous, logs)."""
    env, submit, log = slurm_env
    job_env, d, nodes = _job_env(env, script)
    assert d["ntasks-per-node"] == "1" and d["gpus-per-node"] == "8"
    assert d["output"].startswith("logs/")
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
    cli = torchrun[torchrun.index("-m"):]
    out = submit / "runs" / d["job-name"]
    assert f"train.output_dir={out}" in cli and out.is_dir() and (submit / "logs").is_dir()
    # the job's own stdout file and the per-node logs land in logs/ (created before srun starts)
    assert next(a for a in argv if a.startswith("--output=")).startswith(f"--output={submit}/logs/")
    return d, torchrun, cli


@pytest.mark.parametrize("script", RL_SCRIPTS, ids=lambda p: p.name)
def test_sbatch_launch_line(script, slurm_env):
    d, torchrun, cli = _launch(script, slurm_env)
    assert "requeue" in d
    lead = int(re.fullmatch(r"B:USR1@(\d+)", d["signal"]).group(1))
    shutdown = int(next(a for a in torchrun if a.startswith("--shutdown-timeout=")).split("=")[1])
    assert 0 < shutdown < lead  # the checkpoint finishes before Slurm's time limit
    assert cli[:3] == ["-m", "care_megatron.cli", "train"] and "--resume" in cli
    config = cli[cli.index("--config") + 1]
    load_config(slurm_env[1] / config)  # the recipe the script names exists and validates


@pytest.mark.parametrize("script", SFT_SCRIPTS, ids=lambda p: p.name)
def test_sft_sbatch_writes_the_policy_the_rl_recipes_start_from(script, slurm_env):
    d, _, cli = _launch(script, slurm_env)
    assert "requeue" in d and d["signal"].startswith("B:USR1@")  # care-sft checkpoints at the signal, like RL
    assert cli[:3] == ["-m", "care_megatron.cli", "sft"] and "--resume" in cli
    config = cli[cli.index("--config") + 1]
    model = Path(config).stem.removesuffix("-sft")
    assert config == f"examples/configs/recipes/{model}-sft.yaml" and d["job-name"] == f"{model}-sft"
    submit = slurm_env[1]
    sft = load_config(submit / config)
    assert sft.data.sft_tasks and sft.data.sft_tasks[0].startswith("sharegpt:")
    # care-sft writes <train.output_dir>/sft; the job's output_dir is runs/<job-name> in the submit directory,
    # and every RL recipe of the model (run from the same directory) starts from there
    policy = submit / "runs" / d["job-name"] / "sft"
    rl_recipes = sorted((REPO / "examples" / "configs" / "recipes").glob(f"{model}-*.yaml"))
    rl_recipes = [r for r in rl_recipes if not r.stem.endswith("-sft")]
    assert len(rl_recipes) == 5
    for recipe in rl_recipes:
        assert submit / load_config(recipe).train.init_from == policy, recipe.name
    # and the SFT recipe's own output_dir (a run without Slurm) gives the same relative path
    assert Path(sft.train.output_dir) / "sft" == policy.relative_to(submit)


def _signal_running_job(slurm_env, script: Path, sig: int) -> tuple[subprocess.Popen, str, str]:
    """Run ``script`` as the batch shell with a fake srun that waits; once srun started, send ``sig`` to the
    shell; the finished job and its output."""
    env, submit, log = slurm_env
    job_env, _, _ = _job_env(env, script)
    job = subprocess.Popen(["bash", str(script)], env={**job_env, "FAKE_SRUN_WAIT": "1"}, cwd=submit,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not any("srun" in e for e in _events(log)):
            assert job.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(0.3)  # the fake srun installs its handler right after logging
        job.send_signal(sig)
        stdout, stderr = job.communicate(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
    return job, stdout, stderr


@pytest.mark.parametrize("script,sig,checkpoints", [
    ("care_qwen2_5_vl_7b.sbatch", signal.SIGUSR1, "/checkpoints"),   # what --signal=B:USR1@... delivers
    ("sft_qwen2_5_vl_7b.sbatch", signal.SIGTERM, "/sft_checkpoints"),  # what Slurm sends at preemption
], ids=["rl_usr1", "sft_term"])
def test_preemption_signal_reaches_the_trainers_and_requeues(slurm_env, script, sig, checkpoints):
    """The batch shell forwards the signal to the trainers as USR1 (they checkpoint at the step boundary),
    then requeues the job, which continues with --resume from the command's own checkpoints (RL and SFT)."""
    _, _, log = slurm_env
    job, stdout, stderr = _signal_running_job(slurm_env, SLURM / script, sig)
    assert job.returncode == 0, stderr
    events = _events(log)
    assert {"srun_signal": signal.SIGUSR1} in events
    assert {"scontrol": ["requeue", "4242"]} in events
    assert events.index({"srun_signal": signal.SIGUSR1}) < events.index({"scontrol": ["requeue", "4242"]})
    assert "requeueing job 4242" in stdout and f"{checkpoints}\n" in stdout


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
    # sbatch options before the script reach sbatch unchanged (RL after its SFT job: --dependency)
    result = subprocess.run(["bash", str(clone / "examples" / "slurm" / "submit.sh"), "--dependency=afterok:7",
                             "examples/slurm/y.sbatch"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert [e["sbatch"] for e in _events(log) if "sbatch" in e][-1] == ["--dependency=afterok:7", "examples/slurm/y.sbatch"]
