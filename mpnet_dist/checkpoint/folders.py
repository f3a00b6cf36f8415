"""Where checkpoints are: step-NNNNNNNN/, best/ and final/ under --checkpoint-dir; finding and pruning them.

A folder counts only when complete, i.e. when it holds train_state.json (written last, see writer.py).
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from mpnet_dist.checkpoint.errors import CheckpointError
from mpnet_dist.checkpoint.state import TRAIN_STATE_FILE, read_train_state

logger = logging.getLogger("mpnet_dist")

_STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / TRAIN_STATE_FILE).is_file()


def interval_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete step-N folders, oldest first."""
    if not run_dir.is_dir():
        return []
    found = []
    for child in run_dir.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step among step-N, best and final (ties prefer step-N)."""
    candidates = [(step, 1, path) for step, path in interval_checkpoints(run_dir)]
    for name in ("final", "best"):
        path = run_dir / name
        if is_complete(path):
            candidates.append((read_train_state(path).step, 0, path))
    return max(candidates)[2] if candidates else None


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or a run directory (then `final`, else the newest complete checkpoint)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder or run directory")
    if is_complete(path):
        return path
    if is_complete(path / "final"):
        return path / "final"
    newest = latest_checkpoint(path)
    if newest is None:
        read_train_state(path)  # raises, explaining that the folder is incomplete
    return newest


def prune_checkpoints(run_dir: Path, keep: int, protect: Path | None = None) -> list[Path]:
    """Delete all but the newest `keep` step-N folders (keep < 0: keep all); return those deleted. Main process.

    A folder that cannot be deleted (permissions, a busy network filesystem) is logged and kept in place, so
    the run goes on; it is tried again at the next prune.
    """
    if keep < 0:
        return []
    ckpts = interval_checkpoints(run_dir)
    doomed = [path for _, path in (ckpts[:-keep] if keep > 0 else ckpts)]
    removed = []
    for path in doomed:
        if protect is not None and path.resolve() == protect.resolve():
            continue  # never delete the checkpoint this run resumed from
        try:
            shutil.rmtree(path)
        except OSError as err:
            logger.warning("--keep-checkpoints: could not delete %s (%s); kept it", path, err)
            continue
        removed.append(path)
    return removed
