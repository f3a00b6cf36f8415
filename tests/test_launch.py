"""Stopping a run from outside, through every launcher: SIGINT/SIGTERM save at the next step boundary, end
with a one-line notice and exit code 0, leave no process behind; `mpnet-dist launch` reports failures once.

Each case is a real training run started in its own session, signalled as a terminal would (the whole
process group) or as `kill PID` would (the launcher alone), after its second logged step.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mpnet_dist import launch
from mpnet_dist.metrics import read_metrics
from tests.helpers import CONFIGS, REPO, launch_env, tiny_args

PY = sys.executable
LAUNCHERS = {
    "python -m": [PY, "-m", "mpnet_dist.train"],
    "mpnet-dist launch": [PY, "-m", "mpnet_dist", "launch", "-m", "mpnet_dist.train"],
    "mpnet-dist launch, 2 processes": [PY, "-m", "mpnet_dist", "launch", "--config_file",
                                       str(CONFIGS / "cpu_2proc.yaml"), "--main_process_port", "0", "-m",
                                       "mpnet_dist.train"],
    "accelerate launch": [PY, "-m", "accelerate.commands.launch", "-m", "mpnet_dist.train"],
}  # fmt: skip
# (launcher, signal, sent to): what a terminal's Ctrl-C does (group) and what `kill PID` does (launcher)
CASES = [
    ("python -m", signal.SIGINT, "group"),
    ("mpnet-dist launch", signal.SIGINT, "group"),
    ("mpnet-dist launch", signal.SIGINT, "launcher"),
    ("mpnet-dist launch", signal.SIGTERM, "launcher"),
    ("mpnet-dist launch, 2 processes", signal.SIGINT, "group"),
    ("mpnet-dist launch, 2 processes", signal.SIGTERM, "launcher"),
    ("accelerate launch", signal.SIGINT, "launcher"),  # used to orphan the trainer, which trained on
]


def _stop_run(corpus, root: Path, case: tuple[str, signal.Signals, str]) -> dict:
    import psutil

    name, signum, target = case
    run_dir = root / f"{name}-{signum.name}-{target}".replace(" ", "_").replace(",", "")
    args = tiny_args(corpus, run_dir, "--total-updates", "2000", "--eval-interval-steps", "0")
    log = run_dir.with_suffix(".log")
    with open(log, "w") as fh:
        proc = subprocess.Popen([*LAUNCHERS[name], *args], cwd=REPO, env=launch_env(), stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 500
    while len([r for r in read_metrics(run_dir) if r["split"] == "train"]) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    tree = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signum) if target == "group" else os.kill(proc.pid, signum)
    code = proc.wait(timeout=300)
    survivors = tree
    while survivors and time.monotonic() < deadline:  # a trainer may still be saving after its launcher ended
        survivors = [pid for pid in tree if _alive(pid)]
        time.sleep(0.2)
    return {"code": code, "survivors": survivors, "log": log.read_text(), "run_dir": run_dir}


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def stopped(tiny_corpus, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("stopped")
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda case: _stop_run(tiny_corpus, root, case), CASES))
    return dict(zip(CASES, results, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[f"{n}-{s.name}-{t}" for n, s, t in CASES])
def test_a_stop_request_saves_and_ends_cleanly(case, stopped):
    result = stopped[case]
    log, run_dir = result["log"], result["run_dir"]
    assert not result["survivors"], f"orphaned: {result['survivors']}\n{log[-3000:]}"
    step = int((run_dir / "PREEMPTED").read_text())  # written after the save completed
    assert (run_dir / f"step-{step:08d}" / "train_state.json").is_file()
    assert f"stopped at step {step} after saving step-{step:08d}; continue with --resume" in log
    assert step < 2000 and not (run_dir / "final").exists()
    if case[0] == "accelerate launch":
        return  # its own launcher still ends with a KeyboardInterrupt traceback: README says so
    assert result["code"] == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert log.count("saving at the next step boundary") == 1  # one notice, however many processes


def test_a_second_ctrl_c_ends_with_one_line_and_130(monkeypatch, capsys):
    import mpnet_dist.train as train_module

    def interrupted(cfg):
        raise KeyboardInterrupt  # what StopSignal raises on the second Ctrl-C

    monkeypatch.setattr(train_module, "run", interrupted)
    assert train_module.main(["--total-updates", "1"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("mpnet-dist train: stopped: interrupted") and err.count("\n") == 1


def _failure(exitcode: int, message: str = "", pid: int = 10) -> types.SimpleNamespace:
    error_file = "/tmp/x/error.json" if message else "<N/A>"
    return types.SimpleNamespace(
        exitcode=exitcode, message=message, pid=pid, error_file=error_file, timestamp=0
    )


@pytest.mark.parametrize(
    "failures, code, lines",
    [
        # a user error on every rank: rank 0 printed it; the ranks torch elastic then stopped go unmentioned
        ({0: _failure(-15, "E1"), 1: _failure(2, "E1")}, 2, []),
        ({1: _failure(2, "E1"), 0: _failure(-15)}, 2, ["rank 1: E1"]),  # rank 0 never got to print it
        ({0: _failure(2, "E0"), 1: _failure(2, "E1")}, 2, ["rank 1: E1"]),  # a different error on rank 1
        ({1: _failure(-9, pid=7), 0: _failure(-15)}, 137, ["rank 1 (pid 7) was killed by SIGKILL"]),
        ({0: _failure(1, pid=5)}, 1, ["rank 0 (pid 5) exited with code 1"]),  # a bug: its traceback is above
        ({0: _failure(130, "stopped"), 1: _failure(130, "stopped")}, 130, []),  # a second Ctrl-C
    ],
)
def test_launcher_reports_each_failure_once(failures, code, lines, capsys):
    assert launch._report_failures(failures) == code
    assert capsys.readouterr().err.splitlines() == [f"mpnet-dist launch: {line}" for line in lines]


def test_launcher_defaults_replace_accelerates_warning(monkeypatch, tmp_path, caplog):
    """No --config_file and no `accelerate config`: the defaults are set, not announced in a 6-line warning."""
    import accelerate.commands.config as accelerate_config
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    monkeypatch.setattr(accelerate_config, "default_config_file", str(tmp_path / "absent.yaml"))
    args = launch_command_parser().parse_args(["--num_processes", "2", "-m", "mpnet_dist.train"])
    launch._set_defaults(args)
    assert (args.num_machines, args.mixed_precision, args.dynamo_backend, args.multi_gpu) == (
        1,
        "no",
        "no",
        True,
    )
    monkeypatch.setattr("accelerate.commands.launch.default_config_file", str(tmp_path / "absent.yaml"))
    _validate_launch_command(args)
    assert "had defaults used instead" not in caplog.text
