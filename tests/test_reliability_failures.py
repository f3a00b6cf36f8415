"""Reliability: killed ranks and launchers, interrupted or failed checkpoint writes.

RELIABILITY.md maps each acceptance item to the tests that show it (the rest are in test_reliability_inputs.py).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mpnet_dist.checkpoint import CheckpointError, TrainState, latest_checkpoint
from mpnet_dist.checkpoint import state as checkpoint_state
from mpnet_dist.checkpoint.writer import swap_into_place
from tests.helpers import (
    CONFIGS,
    final_weights,
    finish,
    launch_cmd,
    launch_env,
    tiny_args,
    train,
    train_losses,
)

REPO = Path(__file__).resolve().parents[1]


def same_weights(a: Path, b: Path, name: str = "final") -> bool:
    wa, wb = final_weights(a, name), final_weights(b, name)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference(tiny_corpus, tmp_path_factory) -> Path:
    """An uninterrupted 8-step single-process run (checkpoints every 2 steps, dropout on)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    assert train(tiny_args(tiny_corpus, run_dir, *SINGLE)) == 0
    return run_dir


SINGLE = ("--total-updates", "8", "--checkpoint-interval", "2", "--eval-interval-steps", "0")


# ---- 1. a killed rank or launcher ends the job; --resume gives the same weights -----------------------------------

MULTI = ("--total-updates", "40", "--checkpoint-interval", "4", "--eval-interval-steps", "10")  # dropout on
KILL_DEADLINE_S = 90  # torch elastic SIGKILLs survivors 30 s after its SIGTERM; gloo fails faster than that


def _launch(corpus, run_dir: Path, *extra: str) -> subprocess.Popen:
    """A 2-process DDP run on CPU, with the product's default process-group timeout (not the tests' 120 s)."""
    env = launch_env()
    env.pop("MPNET_DIST_TIMEOUT_S", None)
    cmd = launch_cmd(
        CONFIGS / "cpu_2proc.yaml", tiny_args(corpus, run_dir, *MULTI, *extra), "--main_process_port", "0"
    )
    with open(_log(run_dir), "ab") as log:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _log(run_dir: Path) -> Path:
    return run_dir.parent / f"{run_dir.name}.log"


def _workers(launcher: subprocess.Popen) -> list:
    """The launcher's two worker processes, by rank, once both run."""
    import psutil

    def rank(proc) -> int | None:
        try:
            return int(proc.environ()["RANK"])
        except (psutil.Error, KeyError):  # not a worker, or gone already
            return None

    for _ in range(2400):
        kids = [k for k in psutil.Process(launcher.pid).children() if rank(k) is not None]
        if len(kids) == 2:
            return sorted(kids, key=rank)
        assert launcher.poll() is None, "the launcher exited before starting its workers"
        time.sleep(0.1)
    raise AssertionError("workers did not start")


def _wait_for(path: Path, launcher: subprocess.Popen, run_dir: Path) -> None:
    deadline = time.monotonic() + 300
    while not path.is_file():
        assert launcher.poll() is None and time.monotonic() < deadline, _log(run_dir).read_text()[-3000:]
        time.sleep(0.05)


def _seconds_until_gone(procs: list, since: float) -> float:
    import psutil

    def alive(p) -> bool:
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    while any(alive(p) for p in procs):
        assert time.monotonic() - since < 300, "processes still alive 5 minutes after the kill: a hang"
        time.sleep(0.1)
    return time.monotonic() - since


@pytest.fixture(scope="module")
def multi_reference(tiny_corpus, tmp_path_factory):
    """The uninterrupted 2-process run, started once and left running while the kill tests run theirs."""
    run_dir = tmp_path_factory.mktemp("multi_reference") / "run"
    proc = _launch(tiny_corpus, run_dir)
    yield lambda: finish(proc, _log(run_dir)) or run_dir
    proc.kill()


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["rank1", "launcher"])
def test_sigkill_ends_the_job_and_resume_is_bitwise(victim, tiny_corpus, tmp_path, multi_reference):
    """rank1: torch elastic sees the death and tears the job down (exit != 0). launcher: the orphaned workers
    get SIGTERM from the kernel (stopping.stop_with_launcher), save, write PREEMPTED and exit 0."""
    run_dir = tmp_path / "run"
    launcher = _launch(tiny_corpus, run_dir)
    workers = _workers(launcher)
    _wait_for(run_dir / "step-00000008" / "train_state.json", launcher, run_dir)
    os.kill(launcher.pid if victim == "launcher" else workers[1].pid, signal.SIGKILL)
    killed = time.monotonic()
    code = launcher.wait(timeout=300)
    seconds = _seconds_until_gone(workers, killed)
    print(f"SIGKILL {victim}: every process gone after {seconds:.1f}s")
    assert seconds < KILL_DEADLINE_S
    assert code != 0
    if victim == "launcher":
        stopped_at = int((run_dir / "PREEMPTED").read_text())
        assert latest_checkpoint(run_dir) == run_dir / f"step-{stopped_at:08d}"
    resumed = _launch(tiny_corpus, run_dir, "--resume")
    finish(resumed, _log(run_dir))
    reference = multi_reference()
    assert train_losses(run_dir) == train_losses(reference)  # steps 1..40, each once, bitwise
    assert same_weights(run_dir, reference)


# ---- 2. interrupted and failed checkpoint writes ---------------------------------------------------------------

# Runs the trainer with the write of train_state.json (the last file of a checkpoint) held for 10 minutes in
# the checkpoint named by argv[1], so the test can SIGKILL the process while that folder is half-written.
_SLOW_SAVE = """
import sys, time
import mpnet_dist.checkpoint.writer as c
slow, write = sys.argv.pop(1), c.write_train_state
def delayed(folder, state):
    if slow in str(folder):
        time.sleep(600)
    write(folder, state)
c.write_train_state = delayed
from mpnet_dist.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tiny_corpus, tmp_path, reference):
    run_dir = tmp_path / "run"
    args = tiny_args(tiny_corpus, run_dir, *SINGLE)
    partial = run_dir / ".tmp-step-00000004"
    with open(tmp_path / "train.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, "step-00000004", *args], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (partial / "data_state_rank0.pt").is_file():  # every file but train_state.json is written
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "train.log").read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert (partial / "model.safetensors").is_file() and not (partial / "train_state.json").exists()
    assert not (run_dir / "step-00000004").exists()
    assert latest_checkpoint(run_dir) == run_dir / "step-00000002"  # the partial folder is ignored
    assert train(tiny_args(tiny_corpus, run_dir, *SINGLE, "--resume")) == 0
    assert same_weights(run_dir, reference)  # nothing lost but time: the same weights as without the kill
    assert not list(run_dir.glob(".tmp-*")) and not list(run_dir.glob(".old-*"))


def test_write_error_names_the_folder_and_loses_nothing(tiny_corpus, tmp_path, monkeypatch, reference):
    """A full disk (simulated: ENOSPC while Accelerate writes optimizer.bin of step 4)."""
    import accelerate.checkpointing

    real_save = accelerate.checkpointing.save

    def full_disk(obj, path, *args, **kwargs):
        if "step-00000004" in str(path) and Path(path).name == "optimizer.bin":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", full_disk)
    run_dir = tmp_path / "run"
    with pytest.raises(CheckpointError) as caught:
        train(tiny_args(tiny_corpus, run_dir, *SINGLE))
    message = str(caught.value)
    for part in (str(run_dir / "step-00000004"), "No space left on device", "intact", "--resume"):
        assert part in message, message
    assert not (run_dir / ".tmp-step-00000004").exists()  # the partial folder is freed
    assert latest_checkpoint(run_dir) == run_dir / "step-00000002"
    assert same_weights(run_dir, reference, "step-00000002")
    monkeypatch.undo()
    assert train(tiny_args(tiny_corpus, run_dir, *SINGLE, "--resume")) == 0
    assert same_weights(run_dir, reference)


def test_real_full_disk_on_a_small_tmpfs(tiny_corpus, tmp_path, reference):
    """The run directory on a 1.5 MB tmpfs holds two checkpoints; the third write fails cleanly."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip("needs root and permission to mount a tmpfs")
    try:
        run_dir = mount / "run"
        # torch's own text for a full disk is "[enforce fail at inline_container.cc] unexpected pos ..."
        with pytest.raises(
            CheckpointError, match=r"could not write checkpoint .*step-0000000[4-8] .*0\.\d MiB free"
        ):
            train(tiny_args(tiny_corpus, run_dir, *SINGLE))
        saved = sorted(p.name for p in run_dir.iterdir() if p.name.startswith(("step-", ".tmp", ".old")))
        assert saved == ["step-00000002", "step-00000004"], saved
        for name in saved:
            assert same_weights(run_dir, reference, name), name
        shutil.copytree(run_dir, tmp_path / "moved")  # a bigger disk: resume from what was saved
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    assert train(tiny_args(tiny_corpus, tmp_path / "moved", *SINGLE, "--resume")) == 0
    assert same_weights(tmp_path / "moved", reference)


def test_crash_between_the_renames_of_best_keeps_a_complete_copy(tmp_path, monkeypatch):
    """swap_into_place renames best -> .old-best, then .tmp-best -> best: a crash between leaves no best/."""

    def folder(path: Path, step: int) -> Path:
        path.mkdir()
        checkpoint_state.write_train_state(path, TrainState(step=step, model_config={}, tokenizer_name="t"))
        return path

    best = tmp_path / "best"
    folder(best, 3)
    real_rename = Path.rename

    def crash_on_second_rename(self, target):
        if self.name.startswith(".tmp-"):
            raise OSError("killed")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_on_second_rename)
    with pytest.raises(OSError, match="killed"):
        swap_into_place(folder(tmp_path / ".tmp-best", 6), best)
    monkeypatch.undo()
    assert not best.exists() and checkpoint_state.read_train_state(tmp_path / ".old-best").step == 3
    shutil.rmtree(tmp_path / ".tmp-best")  # what save_checkpoint does first on the next save
    swap_into_place(folder(tmp_path / ".tmp-best", 9), best)
    assert checkpoint_state.read_train_state(best).step == 9 and not (tmp_path / ".old-best").exists()
