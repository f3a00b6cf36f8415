"""`mpnet-dist launch`: Accelerate's launcher, ending the way a command should.

    mpnet-dist launch [ACCELERATE LAUNCH OPTIONS] -m mpnet_dist.train [TRAINING FLAGS]

takes exactly `accelerate launch`'s arguments and runs Accelerate's own launcher (and through it torch elastic
or DeepSpeed's) in this process. Plain `accelerate launch` ends every failed or interrupted run with its own
traceback and exit code 1, whatever the trainer said: a bad flag becomes a 20-line CalledProcessError or
ChildFailedError, and Ctrl-C a SignalException. Here only the ending changes:
- the exit code is the training processes' own: 0 after a completed run or a save-and-stop, 2 for a user error
  (whose one line rank 0 already printed), 130 for an abort; no launcher traceback;
- a user error seen by another rank than 0, or a process killed by a signal, gets one line of its own;
- Ctrl-C, SIGTERM, SIGHUP and SIGUSR1 reach every training process exactly once (they run in their own
  sessions, away from the terminal's signals), which save at the next step boundary and exit; a second Ctrl-C
  aborts them at once. If this process is killed outright, the kernel sends them SIGTERM (stopping.py);
- without --config_file and without a default `accelerate config`, the launcher's defaults are set here
  (one process per GPU, else one; several processes go through torch elastic even on a CPU-only host) instead
  of being announced in Accelerate's 6-line warning.
Accelerate's own `--debug` restores its behaviour, tracebacks included.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from typing import Any

from mpnet_dist.command import EXIT_INTERRUPTED, EXIT_USER_ERROR, UsageError, one_line, run_command

PROG = "mpnet-dist launch"
_FORWARDED = {signal.SIGINT: signal.SIGINT, signal.SIGTERM: signal.SIGTERM, signal.SIGUSR1: signal.SIGUSR1,
              signal.SIGHUP: signal.SIGTERM}  # fmt: skip


class _ExitCode(Exception):
    """The training processes ended with this exit code (already explained to the user)."""

    def __init__(self, code: int):
        self.code = code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    previous = {sig: signal.signal(sig, _forward) for sig in _FORWARDED}  # before the slow imports
    try:
        return run_command(PROG, _launch, argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _launch(argv: list[str]) -> int:
    import accelerate.commands.launch as accelerate_launch

    parser = accelerate_launch.launch_command_parser()
    parser.prog = PROG
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else EXIT_USER_ERROR
    args = _parse(parser, argv)
    if args.debug:  # Accelerate's flag: its own launcher, its own tracebacks
        accelerate_launch.launch_command(args)
        return 0
    _set_defaults(args)
    _quiet_elastic_logs()
    # torch elastic would install its own handlers and end with SignalException; ours forward instead.
    # (Accelerate copies every attribute torchrun's parser knows into torchrun's arguments.)
    args.signals_to_handle = "SIGQUIT"
    accelerate_launch.simple_launcher = _simple_launcher  # one process: started in its own session
    try:
        accelerate_launch.launch_command(args)
    except _ExitCode as done:
        return done.code
    except subprocess.CalledProcessError as err:  # DeepSpeed's pdsh launcher
        return _exit_code(err.returncode)
    except Exception as err:
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

        if not isinstance(err, ChildFailedError):
            raise
        return _report_failures(err.failures)
    return 0


def _parse(parser: Any, argv: list[str]) -> Any:
    """Accelerate's parser, with its argparse exit turned into our one-line UsageError."""

    def error(message: str) -> None:  # argparse would print the whole usage and exit
        raise UsageError(f"{message}; see {PROG} --help")

    parser.error = error
    args = parser.parse_args(argv)
    if args.config_file is not None and not os.path.isfile(args.config_file):
        raise UsageError(f"--config_file {args.config_file}: no such file")
    return args


def _set_defaults(args: Any) -> None:
    """What Accelerate would otherwise pick with a warning, when neither a config file nor a default exists."""
    from accelerate.commands.config import default_config_file

    if args.config_file is not None or os.path.isfile(default_config_file):
        return
    import torch

    gpus = torch.cuda.device_count()
    if args.num_processes is None:
        args.num_processes = max(gpus, 1)
    if args.num_machines is None:
        args.num_machines = 1
    if args.mixed_precision is None:
        args.mixed_precision = "no"  # the trainer's own default applies (bf16 on CUDA): distributed.py
    if args.dynamo_backend is None:
        args.dynamo_backend = "no"
    if args.num_processes > 1 and not (args.use_deepspeed or args.use_fsdp or args.cpu):
        args.multi_gpu = True  # torch elastic, also on a CPU-only host (the simple launcher starts only one)


def _simple_launcher(args: Any) -> None:
    """Accelerate's simple_launcher, except that the trainer gets its own session: the terminal's Ctrl-C then
    reaches it once, through _forward, instead of twice (directly and forwarded)."""
    from accelerate.utils import prepare_simple_launcher_cmd_env

    cmd, env = prepare_simple_launcher_cmd_env(args)
    code = subprocess.Popen(cmd, env=env, start_new_session=True).wait()
    if code < 0:
        print(f"{PROG}: the training process was killed by {signal.Signals(-code).name}", file=sys.stderr)
    raise _ExitCode(_exit_code(code))


def _forward(signum: int, frame: Any) -> None:
    """Pass a stop request on to every training process (our direct children)."""
    import psutil

    children = psutil.Process().children()
    if not children:  # nothing started yet: stop here
        raise KeyboardInterrupt
    for child in children:
        try:
            child.send_signal(_FORWARDED[signal.Signals(signum)])
        except psutil.NoSuchProcess:
            continue


def _report_failures(failures: dict[int, Any]) -> int:
    """One line for each failure the user has not seen yet; the exit code of the failure that explains the rest.

    A rank that hit a user error wrote its line into torch elastic's error file (command.report_error), and rank
    0 also printed it. The ranks elastic then stopped with SIGTERM are collateral and go unmentioned.
    """
    explained = {rank: f for rank, f in failures.items() if f.error_file != "<N/A>" and f.message}
    shown = {explained[0].message} if 0 in explained else set()
    for rank, failure in sorted(explained.items()):
        if failure.message not in shown:
            shown.add(failure.message)
            print(f"{PROG}: rank {rank}: {one_line(failure.message)}", file=sys.stderr)
    causes = (
        explained
        or {r: f for r, f in failures.items() if f.exitcode > 0}
        or {
            r: f for r, f in failures.items() if f.exitcode != -signal.SIGTERM
        }  # e.g. the OOM killer's SIGKILL
        or failures
    )
    for rank, failure in sorted(failures.items()):
        if rank in explained or (rank not in causes and failure.exitcode == -signal.SIGTERM):
            continue
        how = (
            f"was killed by {signal.Signals(-failure.exitcode).name}"
            if failure.exitcode < 0
            else f"exited with code {failure.exitcode}"
        )
        print(f"{PROG}: rank {rank} (pid {failure.pid}) {how}", file=sys.stderr)
    codes = [f.exitcode for _, f in sorted(causes.items())]
    return next((code for code in codes if code > 0), EXIT_USER_ERROR if explained else _exit_code(codes[0]))


def _quiet_elastic_logs() -> None:
    """torch elastic logs each stop and failure (W/E lines) that the lines above already report."""

    def keep(record: logging.LogRecord) -> bool:
        if not record.name.startswith("torch.distributed.elastic"):
            return True
        return record.levelno >= logging.ERROR and not record.getMessage().startswith("failed (exitcode")

    for handler in logging.getLogger("torch.distributed").handlers:
        handler.addFilter(keep)


def _exit_code(code: int) -> int:
    """A process killed by signal N reads as 128 + N, as in a shell; SIGINT as an interrupted run."""
    if code == -signal.SIGINT:
        return EXIT_INTERRUPTED
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
