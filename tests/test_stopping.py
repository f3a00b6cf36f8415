"""stopping.py: signals and the PREEMPT file ask for a save-and-stop; a second Ctrl-C aborts."""

from __future__ import annotations

import os
import signal

import pytest

from mpnet_dist.stopping import PREEMPT_FILE, StopSignal


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT])
def test_a_signal_only_sets_the_flag(tmp_path, signum):
    stop = StopSignal(tmp_path)
    try:
        assert not stop.poll()
        os.kill(os.getpid(), signum)
        assert stop.poll() and stop.requested
    finally:
        stop.close()


def test_the_preempt_file_asks_for_a_stop(tmp_path):
    stop = StopSignal(tmp_path)
    try:
        assert not stop.poll()
        (tmp_path / PREEMPT_FILE).touch()
        assert stop.poll() and not stop.requested
    finally:
        stop.close()


def test_second_ctrl_c_aborts_and_close_restores_the_handlers(tmp_path):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    stop = StopSignal(tmp_path)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.close()
    assert {sig: signal.getsignal(sig) for sig in before} == before
