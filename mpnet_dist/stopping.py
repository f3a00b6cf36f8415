"""Stopping cleanly: preemption signals, a PREEMPT file, Ctrl-C, and a launcher that died.

A handler only sets a flag; train_step all-reduces it so every rank stops at the same step boundary, after
the loop has saved a checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

logger = logging.getLogger("mpnet_dist")

PREEMPT_FILE = "PREEMPT"  # touched by slurm/pretrain.sh (or a user) to ask for a save-and-stop
PREEMPTED_MARKER = "PREEMPTED"  # written when the run stopped early after saving; the SLURM script requeues


class StopSignal:
    """Signal handlers only set a flag; the ranks agree on stopping at the next step boundary.

    SIGUSR1/SIGTERM (SLURM, the launcher) and a first Ctrl-C ask for save-and-stop; a second Ctrl-C aborts.
    """

    def __init__(self, run_dir: Path):
        self.requested = False
        self.file = run_dir / PREEMPT_FILE
        self._previous = {
            sig: signal.signal(sig, self._handle) for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
        }

    def close(self) -> None:
        """Give the handlers back (training can run inside a larger program, e.g. a notebook or a test)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt  # the user insists: stop now, without saving
        if not self.requested:  # info: rank 0 says it once, not every rank
            what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            again = " (Ctrl-C again to abort now, without saving)" if signum == signal.SIGINT else ""
            logger.info("%s: saving at the next step boundary, then stopping%s", what, again)
        self.requested = True

    def poll(self) -> bool:
        return self.requested or self.file.exists()


def stop_with_launcher() -> None:
    """Under a launcher (accelerate launch, mpnet-dist launch, torchrun), have the kernel send us SIGTERM when it
    dies.

    torch elastic starts each worker in its own session, so a launcher killed with SIGKILL (OOM killer, kill -9)
    leaves the workers training on, unsupervised and still writing into the run directory. Accelerate's
    single-process launcher is worse: a SIGINT or SIGTERM sent to it alone ends it and leaves the trainer running
    to the end without a word. With this, the launcher's death takes the preemption path instead: the ranks
    agree, save, write PREEMPTED and exit (before the handler is installed SIGTERM simply ends the process, which
    has nothing to save yet). LOCAL_RANK marks torch elastic's workers, ACCELERATE_DYNAMO_BACKEND the simple
    launcher's one process (`accelerate launch` sets it for every process it starts).
    """
    launched = "LOCAL_RANK" in os.environ or "ACCELERATE_DYNAMO_BACKEND" in os.environ
    if sys.platform != "linux" or not launched:
        return
    import ctypes

    launcher = os.getppid()
    pr_set_pdeathsig = 1
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) != 0:
        return  # not fatal: only the orphan protection is lost
    # Reparented meanwhile: the launcher died before the request took effect. (Comparing with 1 instead would
    # stop every run whose launcher *is* PID 1, e.g. `accelerate launch` as a container's main process.)
    if os.getppid() != launcher:
        raise SystemExit("mpnet-dist train: the launcher exited during startup; nothing was trained")
