"""slurm/pretrain.sh on a real one-node SLURM cluster started on this machine (Debian's slurm-wlm + munge).

The job trains a tiny model with 2 processes; the test sends the batch shell SIGUSR1 mid-training (what
`#SBATCH --signal=B:USR1@300` does before the time limit). The ranks agree to stop at a step boundary, save, and
the script requeues the job, which resumes by itself and must end with the weights of an uninterrupted run.
Needs root (apt-get, munge's user); skips with the reason when the packages cannot be installed.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from mpnet_dist.metrics import read_metrics
from tests import corpus
from tests.helpers import CONFIGS, REPO, finish, launch_env, start, tail, tiny_args, train_state, weights

tiny_corpus = corpus.tiny_corpus  # session fixture

SLURM_TEST_DIR = REPO / "tests" / "slurm"
PACKAGES = ("slurm-wlm", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo", "munged", "mungekey")
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
TOTAL_STEPS = 60  # long enough (several seconds) that a signal sent after step 1 lands mid-training


def _missing() -> list[str]:
    return [b for b in BINARIES if shutil.which(b, path=SBIN_PATH) is None]


def _apt(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(["apt-get", *args], env=env, capture_output=True, text=True, timeout=600)


def ensure_slurm() -> None:
    """Install slurm-wlm and munge with apt-get when missing (a fresh CI machine has only Python)."""
    if not _missing():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(
            f"SLURM binaries {_missing()} missing and apt-get unavailable or not root: cannot install them"
        )
    result = _apt("install", "-y", "-q", "--no-install-recommends", *PACKAGES)
    if result.returncode != 0:  # stale or absent package lists on a fresh machine
        _apt("update", "-q")
        result = _apt("install", "-y", "-q", "--no-install-recommends", *PACKAGES)
    if result.returncode != 0 or _missing():
        pytest.skip(f"apt-get could not install {' '.join(PACKAGES)}: {result.stderr.strip()[-500:]}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(cmd: list[str], env: dict, check: bool = True) -> str:
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stdout}{result.stderr}")
    return result.stdout


@pytest.fixture(scope="module")
def cluster():
    ensure_slurm()
    # Not under pytest's tmp folder: munged (its own user) must traverse every parent of its socket folder.
    base = Path(tempfile.mkdtemp(prefix="mpnet-slurm-", dir="/tmp"))
    base.chmod(0o711)
    conf = (SLURM_TEST_DIR / "slurm.conf.in").read_text()
    for key, value in {"BASE": base, "CTLD_PORT": _free_port(), "SLURMD_PORT": _free_port(),
                       "CPUS": os.cpu_count() or 1, "FIRST_JOB_ID": random.randrange(1, 50000)}.items():  # fmt: skip
        conf = conf.replace(f"@{key}@", str(value))
    (base / "slurm.conf").write_text(conf)
    env = dict(os.environ, BASE=str(base), SLURM_CONF=str(base / "slurm.conf"), PATH=SBIN_PATH)
    state = {"env": env, "base": base, "jobs": []}
    try:
        started = subprocess.run(["bash", str(SLURM_TEST_DIR / "start.sh")], env=env, capture_output=True,
                                 text=True, timeout=120)  # fmt: skip
        logs = "\n".join(
            f"{p}:\n{p.read_text(errors='replace')[-1500:]}" for p in (base / "log").glob("*.log")
        )
        assert started.returncode == 0, f"cluster did not start: {started.stdout}{started.stderr}\n{logs}"
        yield state
    finally:
        for job in state["jobs"]:  # a failed test must not leave training processes behind
            _run(["scancel", job], env, check=False)
        deadline = time.monotonic() + 30
        while (
            state["jobs"] and time.monotonic() < deadline and _run(["squeue", "-h"], env, check=False).strip()
        ):
            time.sleep(0.5)
        subprocess.run(["bash", str(SLURM_TEST_DIR / "stop.sh")], env=env, capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def _job_field(job: str, env: dict, name: str) -> str:
    match = re.search(rf"\b{name}=(\S+)", _run(["scontrol", "show", "job", job], env, check=False))
    return match.group(1) if match else ""


def _wait_for(predicate, timeout: float, what: str, out: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f}s waiting for {what}; job output:\n{tail(out)}"
            )
        time.sleep(0.2)


def _train_steps(run_dir: Path) -> list[int]:
    try:
        return [r["step"] for r in read_metrics(run_dir) if r["split"] == "train"]
    except (FileNotFoundError, ValueError):  # not written yet, or a line half-written
        return []


@pytest.mark.slow
def test_signalled_job_saves_requeues_and_resumes_to_the_same_weights(cluster, tiny_corpus, tmp_path):
    env = cluster["env"]
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    args = tiny_args(tiny_corpus, run_dir, "--total-updates", str(TOTAL_STEPS), "--eval-interval-steps", "0")
    job_env = launch_env(
        SLURM_CONF=env["SLURM_CONF"],
        PATH=os.pathsep.join([str(Path(sys.executable).parent), SBIN_PATH]),  # `accelerate` of this Python
        RUN_DIR=str(run_dir),
        RECIPE="",
        ARGS=" ".join(args),
        LAUNCH_CONFIG="launch_configs/accelerate/ddp_8gpu.yaml",
        GPUS_PER_NODE="2",
    )
    submit = ["sbatch", "--parsable", "--nodes=1", "--time=10", "--job-name=mpnet-test", f"--output={out}",
              "slurm/pretrain.sh"]  # fmt: skip
    result = subprocess.run(submit, cwd=REPO, env=job_env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip().split(";")[0]
    cluster["jobs"].append(job)

    done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")
    _wait_for(lambda: _train_steps(run_dir) or _job_field(job, env, "JobState") in done, 180, "training", out)
    assert _train_steps(run_dir), f"the job ended before training started:\n{tail(out)}"
    _run(["scancel", "--signal=USR1", "--batch", job], env)
    # The uninterrupted reference run shares the CPUs with the job while it stops, waits and resumes.
    ref_dir, ref_log = tmp_path / "reference", tmp_path / "reference.log"
    ref_args = [a if a != str(run_dir) else str(ref_dir) for a in args]
    reference = start(CONFIGS / "ddp_8gpu.yaml", ref_args, "--num_processes", "2", "--main_process_port", "0",
                      log=ref_log)  # fmt: skip

    def finished() -> bool:  # a requeued job passes through states that look final only with Restarts=0
        if _job_field(job, env, "JobState") not in done:
            return False
        return _job_field(job, env, "Restarts") != "0" or "requeueing job" not in out.read_text(
            errors="replace"
        )

    _wait_for(finished, 300, "the requeued job to finish", out)
    finish(reference, ref_log)

    text = out.read_text(errors="replace")
    assert _job_field(job, env, "JobState") == "COMPLETED", text[-3000:]
    assert _job_field(job, env, "Restarts") == "1", text[-3000:]
    # --open-mode=append: both runs' output is in the one file
    assert f"job {job} restart 0" in text and f"job {job} restart 1" in text, text[-3000:]
    assert f"head localhost:{10000 + int(job) % 50000}" in text  # port derived from the job id
    stopped = re.search(r"stop requested: saved step (\d+)", text)
    assert stopped, f"the first run did not stop on the signal:\n{text[-3000:]}"
    k = int(stopped.group(1))
    assert 1 <= k < TOTAL_STEPS and f"requeueing job {job}" in text
    assert re.search(rf"resumed from \S*step-{k:08d} at step {k}", text), text[-3000:]
    assert _train_steps(run_dir) == list(range(1, TOTAL_STEPS + 1))  # every step logged once across both runs
    assert not (run_dir / "PREEMPTED").exists() and not (run_dir / "PREEMPT").exists()
    state = train_state(run_dir)
    assert (state["step"], state["world_size"], state["distributed_type"]) == (
        TOTAL_STEPS, 2, "DistributedType.MULTI_CPU")  # fmt: skip
    a, b = weights(run_dir), weights(ref_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), f"interrupted at step {k}"
