"""The run folder (--checkpoint-dir): which checkpoint a run continues from, and never two runs in one folder.

A folder holds a run when it has a complete checkpoint or a metrics.jsonl. A new run there (no --resume) is
refused: its best/, final/ and metrics would replace the old run's piecemeal while the old step-N folders stayed,
and a later --resume would continue the old run. The same holds for resuming from a checkpoint of another
folder into one that holds a run, and for resuming from an older checkpoint of the run while later ones exist
(they belong to the future being abandoned). `--overwrite` deletes the conflicting run's files first; only files
mpnet-dist writes are deleted (RUN_FILES and checkpoint folders), and the log names each one.

Rank 0 decides, verifies the checkpoint and deletes; the other ranks take its decision (`decide_on_rank_zero`),
so every rank resumes from the same checkpoint or stops with the same error.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from mpnet_dist.checkpoint import (
    TRAIN_STATE_FILE,
    CheckpointError,
    check_checkpoint,
    complete_checkpoints,
    latest_checkpoint,
    read_train_state,
)
from mpnet_dist.config import ConfigError, TrainConfig, dump_yaml
from mpnet_dist.errors import UserError
from mpnet_dist.metrics import read_metrics
from mpnet_dist.stopping import PREEMPT_FILE, PREEMPTED_MARKER

logger = logging.getLogger("mpnet_dist")

METRICS_FILE = "metrics.jsonl"
RUN_FILES = (METRICS_FILE, "config.yaml", PREEMPT_FILE, PREEMPTED_MARKER)
_CHECKPOINT_DIR = re.compile(r"^(\.(tmp|old)-)?(step-\d{8}|best|final)$")

T = TypeVar("T")


def decide_on_rank_zero(accelerator: Any, decide: Callable[[], T]) -> T:
    """decide() on rank 0 only; every rank returns its result or raises its UserError (same message)."""
    outcome: list[Any] = [None, None]
    if accelerator.is_main_process:
        try:
            outcome = [decide(), None]
        except UserError as err:
            outcome = [None, err]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(outcome, from_process=0)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


def claim_run_folder(cfg: TrainConfig) -> Path | None:
    """The checkpoint to resume from (checked whole), after making sure the run folder holds no other run."""
    run_dir = Path(cfg.checkpoint_dir)
    resume_from = resolve_resume(cfg, run_dir)
    if resume_from is not None:
        check_checkpoint(resume_from)
    conflicts = _conflicts(run_dir, resume_from, cfg.resume)
    if conflicts and not cfg.overwrite:
        raise ConfigError(_refusal(run_dir, resume_from, conflicts))
    if conflicts:
        for path in conflicts:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        names = ", ".join(p.name for p in conflicts)
        logger.warning("--overwrite: deleted from %s what the other run left there: %s", run_dir, names)
    return resume_from


def resolve_resume(cfg: TrainConfig, run_dir: Path) -> Path | None:
    """--resume-checkpoint PATH (checked to be an mpnet-dist checkpoint), or with --resume the newest complete one."""
    if cfg.resume_checkpoint:
        path = Path(cfg.resume_checkpoint)
        if path.is_file():
            raise CheckpointError(
                f"--resume-checkpoint {path} is a file, not an mpnet-dist checkpoint folder (step-N, best, final). "
                "An annotated-mpnet .pt holds no resumable optimizer/data state: convert its weights "
                f"(`mpnet-dist export {path} OUT`) and start a new run with --hf-model-path OUT."
            )
        if not path.is_dir():
            raise CheckpointError(f"--resume-checkpoint {path}: no such folder")
        if not (path / TRAIN_STATE_FILE).is_file() and (path / "config.json").is_file():
            raise CheckpointError(
                f"--resume-checkpoint {path} is a Hugging Face model folder, not an mpnet-dist checkpoint: to "
                f"start from its weights use --hf-model-path {path} (a new run, fresh optimizer) instead."
            )
        return path
    if not cfg.resume:
        return None
    found = latest_checkpoint(run_dir)
    if found is None and run_dir.is_dir() and any(run_dir.glob("*.pt")):
        logger.warning(
            "--resume: %s holds .pt files but no mpnet-dist checkpoint; annotated-mpnet checkpoints cannot "
            "be resumed: export one (`mpnet-dist export FILE.pt OUT`) and start from --hf-model-path OUT",
            run_dir,
        )
    return found


def run_files(run_dir: Path) -> list[Path]:
    """Everything a run writes into its folder: checkpoint folders (also unfinished ones) and RUN_FILES."""
    if not run_dir.is_dir():
        return []
    folders = [p for p in run_dir.iterdir() if p.is_dir() and _CHECKPOINT_DIR.match(p.name)]
    files = [run_dir / name for name in RUN_FILES if (run_dir / name).is_file()]
    return sorted(folders) + files


def holds_run(run_dir: Path) -> bool:
    return bool(complete_checkpoints(run_dir)) or (run_dir / METRICS_FILE).is_file()


def _conflicts(run_dir: Path, resume_from: Path | None, resume: bool) -> list[Path]:
    """What another run (or another future of this one) left in run_dir; empty when the folder is free."""
    if resume_from is None:
        # --resume with nothing to resume starts over (a requeued job that never saved must be able to start):
        # the folder has no checkpoint, and prepare_run_folder drops the metrics of the steps to be redone.
        return run_files(run_dir) if holds_run(run_dir) and not resume else []
    if run_dir.resolve() != resume_from.resolve().parent:
        return run_files(run_dir) if holds_run(run_dir) else []
    step = read_train_state(resume_from).step
    return [path for path in complete_checkpoints(run_dir) if read_train_state(path).step > step]


def _refusal(run_dir: Path, resume_from: Path | None, conflicts: list[Path]) -> str:
    names = ", ".join(p.name for p in conflicts[:6]) + (", ..." if len(conflicts) > 6 else "")
    if resume_from is not None and run_dir.resolve() == resume_from.resolve().parent:
        return (
            f"--resume-checkpoint {resume_from}: {run_dir} also holds later checkpoints of this run ({names}), "
            "which continuing from an earlier step would mix with the new ones. Pass --overwrite to delete them "
            "first, or continue into a new --checkpoint-dir"
        )
    return (
        f"--checkpoint-dir {run_dir} already holds a run ({names}). Continue it with --resume, start this run in "
        "a new --checkpoint-dir, or pass --overwrite to delete that run's checkpoints, metrics.jsonl and "
        "config.yaml first"
    )


def prepare_run_folder(accelerator: Any, cfg: TrainConfig, step: int) -> None:
    """config.yaml of this run; metrics of steps after `step` and stale stop markers removed (rank 0)."""
    run_dir = Path(cfg.checkpoint_dir)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, run_dir / "config.yaml")
        _truncate_metrics(run_dir, step)
        (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        (run_dir / PREEMPT_FILE).unlink(missing_ok=True)
    accelerator.wait_for_everyone()


def _truncate_metrics(run_dir: Path, step: int) -> None:
    """A resumed run re-does the steps after its checkpoint: drop their records so each step appears once.

    A run starting at step 0 keeps none (its step-0 evaluation is done again)."""
    records = read_metrics(run_dir)
    kept = [r for r in records if r["step"] <= step] if step > 0 else []
    if len(kept) != len(records):
        (run_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in kept))
