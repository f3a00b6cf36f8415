"""Is a checkpoint whole? Checked before anything of it is loaded.

A checkpoint written by this version carries a manifest in train_state.json: the name, size and SHA-256 of every
other file of the folder, computed by rank 0 once all ranks have written theirs (writer.py). Loading compares
the folder with it, so a missing, truncated or altered file is refused before any of it is read. A checkpoint
written before manifests existed gets the checks that need no manifest: every file each saving rank wrote
(its RNG state and data position, the model and optimizer state) must be present and non-empty.

A refusal names the file, says whether the checkpoint is incomplete (a file is missing) or damaged (a file
differs from what was written), and names the newest other checkpoint of the run to use instead.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mpnet_dist.checkpoint.errors import CheckpointError
from mpnet_dist.checkpoint.folders import complete_checkpoints
from mpnet_dist.checkpoint.state import TRAIN_STATE_FILE, TrainState, data_state_file

_CHUNK = 8 * 2**20


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read in chunks (the same value `sha256sum FILE` prints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"size": bytes, "sha256": hex}} for every file in `folder` except train_state.json."""
    paths = [p for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.name != TRAIN_STATE_FILE]
    digests = _digests(paths)
    return {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": d}
        for p, d in zip(paths, digests, strict=True)
    }


def _digests(paths: list[Path]) -> list[str]:
    """SHA-256 of each file, several files at a time (hashlib releases the GIL: ZeRO shards hash in parallel)."""
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        return list(pool.map(file_digest, paths))


# What an export reads: the model weights (Accelerate's file, or DeepSpeed's folder).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model/")


def verify_checkpoint(folder: Path, state: TrainState, only: tuple[str, ...] = ()) -> None:
    """Raise CheckpointError naming the first missing, truncated or altered file (nothing is loaded here).

    `only`: check just the files whose names start with one of these (an export needs the weights alone)."""
    folder = Path(folder)
    if state.manifest:
        manifest = {k: v for k, v in state.manifest.items() if not only or k.startswith(only)}
        problem = _manifest_problem(folder, manifest)
    else:
        needed = [name for name in required_files(folder, state) if not only or name.startswith(only)]
        problem = _required_problem(folder, needed, state.world_size)
    if problem is not None:
        raise CheckpointError(f"{problem} {other_checkpoint(folder)}")


def _manifest_problem(folder: Path, manifest: dict[str, dict[str, Any]]) -> str | None:
    for name, expected in manifest.items():
        path = folder / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"{path}: missing, so the checkpoint {folder} is incomplete (its manifest lists {name})."
        except OSError as err:
            return f"{path}: unreadable ({err}); the checkpoint {folder} cannot be used."
        if size != expected["size"]:
            return (
                f"{path}: {size:,} bytes where {expected['size']:,} were written, so the checkpoint {folder} is "
                "damaged (the file was truncated or replaced)."
            )
    names = list(manifest)  # sizes first (above): a missing file is found without reading gigabytes
    try:
        digests = _digests([folder / name for name in names])
    except OSError as err:
        return f"{err.filename}: unreadable ({err.strerror}); the checkpoint {folder} cannot be used."
    for name, digest in zip(names, digests, strict=True):
        expected = manifest[name]
        if digest != expected["sha256"]:
            return (
                f"{folder / name}: its contents differ from what was written (SHA-256 mismatch), so the "
                f"checkpoint {folder} is damaged."
            )
    return None


def required_files(folder: Path, state: TrainState) -> list[str]:
    """What every rank of the saving run wrote, for a checkpoint without a manifest (names relative to folder)."""
    ranks = range(max(state.world_size, 1))
    names = [data_state_file(r) for r in ranks] + [f"random_states_{r}.pkl" for r in ranks]
    if state.zero_stage > 0 or (folder / "pytorch_model").is_dir():
        tag = folder / "pytorch_model"
        names.append("pytorch_model/mp_rank_00_model_states.pt")
        for r in ranks:
            shards = sorted(tag.glob(f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt")) if tag.is_dir() else []
            names.append(
                shards[0].relative_to(folder).as_posix() if shards else f"pytorch_model/*zero_pp_rank_{r}_*"
            )
    else:
        names.append("pytorch_model.bin" if (folder / "pytorch_model.bin").is_file() else "model.safetensors")
        names.append("optimizer.bin")
    return names


def _required_problem(folder: Path, names: list[str], world_size: int) -> str | None:
    for name in names:
        path = folder / name
        if not path.is_file():
            return (
                f"{path}: missing, so the checkpoint {folder} is incomplete (the {world_size}-process run that "
                "wrote it saves this file)."
            )
        if not os.access(path, os.R_OK):
            return f"{path}: not readable (permissions); the checkpoint {folder} cannot be used."
        if path.stat().st_size == 0:
            return f"{path}: empty, so the checkpoint {folder} is damaged."
    return None


def other_checkpoint(folder: Path) -> str:
    """The newest other complete checkpoint of the same run, as the advice that ends a refusal."""
    others = [path for path in complete_checkpoints(folder.parent) if path.resolve() != folder.resolve()]
    if not others:
        return f"No other complete checkpoint is in {folder.parent}."
    return f"Use another checkpoint of the run instead: {others[0]} is the newest other complete one."
