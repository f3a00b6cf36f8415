"""integrity.py: the manifest in train_state.json, and the checks made before anything of a checkpoint loads."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from mpnet_dist.checkpoint import CheckpointError, check_checkpoint, read_train_state
from mpnet_dist.checkpoint.integrity import required_files, verify_checkpoint
from mpnet_dist.checkpoint.weights_only import unloadable_reason
from tests.helpers import tiny_args, train


@pytest.fixture(scope="module")
def run(tiny_corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("integrity") / "run"
    args = tiny_args(tiny_corpus, run_dir, "--total-updates", "2", "--checkpoint-interval", "1")
    assert train([*args, "--eval-interval-steps", "0"]) == 0
    return run_dir


@pytest.fixture()
def copy(run, tmp_path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run")) / "step-00000002"


def test_the_manifest_lists_every_file_with_its_size_and_sha256(run):
    folder = run / "step-00000002"
    manifest = read_train_state(folder).manifest
    on_disk = sorted(p.name for p in folder.iterdir() if p.name != "train_state.json")
    assert sorted(manifest) == on_disk == sorted(required_files(folder, read_train_state(folder)))
    for name, entry in manifest.items():  # what `sha256sum FILE` prints
        data = (folder / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "data_state_rank0.pt").unlink(), r"data_state_rank0.pt: missing, .* is incomplete"),
        (lambda f: os.truncate(f / "optimizer.bin", 10), r"optimizer.bin: 10 bytes where .* is damaged"),
        (
            lambda f: _flip_last_byte(f / "model.safetensors"),
            r"model.safetensors: .*SHA-256 mismatch.* damaged",
        ),
    ],
)
def test_a_missing_or_changed_file_is_refused_naming_it_and_another_checkpoint(copy, damage, message):
    damage(copy)
    with pytest.raises(CheckpointError, match=message) as caught:
        check_checkpoint(copy)
    assert f"{copy.parent / 'final'} is the newest other complete one" in str(caught.value)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_checkpoint_without_manifest_gets_the_per_file_checks(copy):
    state = json.loads((copy / "train_state.json").read_text())
    del state["manifest"]
    state.update(format_version=1, world_size=2)  # as written by a 2-process run before manifests existed
    (copy / "train_state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"data_state_rank1.pt: missing, .*incomplete .*2-process run"):
        check_checkpoint(copy)
    for rank in (1,):
        shutil.copy(copy / "data_state_rank0.pt", copy / f"data_state_rank{rank}.pt")
        shutil.copy(copy / "random_states_0.pkl", copy / f"random_states_{rank}.pkl")
    check_checkpoint(copy)
    (copy / "optimizer.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="optimizer.bin: empty"):
        check_checkpoint(copy)


def test_the_export_checks_only_the_weights(copy):
    state = read_train_state(copy)
    (copy / "optimizer.bin").write_bytes(b"x" * 10)
    verify_checkpoint(copy, state, only=("model.safetensors", "pytorch_model.bin", "pytorch_model/"))
    with pytest.raises(CheckpointError, match="optimizer.bin"):
        verify_checkpoint(copy, state)


def test_damaged_bytes_and_foreign_pickles_get_different_advice(copy, tmp_path):
    (tmp_path / "random.bin").write_bytes(os.urandom(1000))
    torch.save({"step": torch.tensor(3)}, tmp_path / "plain.pt")
    torch.save(print, tmp_path / "foreign.pt")  # a pickled function: outside the allow-list
    assert "damaged" in unloadable_reason(tmp_path / "random.bin")
    assert "--trust-checkpoint cannot help" in unloadable_reason(tmp_path / "random.bin")
    assert unloadable_reason(tmp_path / "plain.pt") is None
    assert (
        unloadable_reason(copy / "random_states_0.pkl") is None
    )  # numpy RNG state: allowed, as Accelerate does
    foreign = unloadable_reason(tmp_path / "foreign.pt")
    assert "builtins.print" in foreign and "re-run with --trust-checkpoint" in foreign
