"""run_folder.py: a --checkpoint-dir holds one run; another is refused, or replaced with --overwrite."""

from __future__ import annotations

import pytest

from mpnet_dist.checkpoint import complete_checkpoints, read_train_state
from mpnet_dist.config import ConfigError
from mpnet_dist.metrics import read_metrics
from tests.helpers import tiny_args, train

SHORT = ("--total-updates", "4", "--checkpoint-interval", "2", "--eval-interval-steps", "2")


def _tree(root) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.fixture()
def finished(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    assert train(tiny_args(tiny_corpus, run_dir, *SHORT)) == 0
    (run_dir / "notes.txt").write_text("the user's own file")
    (run_dir / "tb").mkdir()  # e.g. a --tensorboard-log-dir inside the folder
    return run_dir


def test_a_second_run_is_refused_and_touches_nothing(tiny_corpus, finished):
    before = _tree(finished)
    with pytest.raises(ConfigError, match=r"already holds a run \(best, final, step-00000002, step-00000004, "
                                          r"metrics.jsonl, config.yaml\).*--resume.*--overwrite"):  # fmt: skip
        train(tiny_args(tiny_corpus, finished, *SHORT, "--seed", "8"))
    assert _tree(finished) == before


def test_overwrite_deletes_only_what_the_old_run_wrote(tiny_corpus, finished, capsys):
    assert train(tiny_args(tiny_corpus, finished, "--total-updates", "3", "--overwrite", "--seed", "8")) == 0
    log = capsys.readouterr().out  # the log names each thing it deleted
    assert "--overwrite: deleted from" in log and "step-00000004, metrics.jsonl, config.yaml" in log
    assert (finished / "notes.txt").read_text() == "the user's own file" and (finished / "tb").is_dir()
    assert [p.name for p in complete_checkpoints(finished)] == ["final", "best"]  # no step-N of the old run
    assert read_train_state(finished / "final").config["seed"] == 8
    steps = [r["step"] for r in read_metrics(finished) if r["split"] == "train"]
    assert steps == [1, 2, 3]  # the new run's records only, each once


def test_resuming_another_folders_checkpoint_into_a_used_folder_is_refused(tiny_corpus, finished, tmp_path):
    other = tmp_path / "other"
    assert train(tiny_args(tiny_corpus, other, "--total-updates", "1", "--eval-interval-steps", "0")) == 0
    args = tiny_args(tiny_corpus, other, *SHORT, "--resume-checkpoint", str(finished / "step-00000002"))
    with pytest.raises(ConfigError, match=f"--checkpoint-dir {other} already holds a run"):
        train(args)
    assert train([*args, "--overwrite"]) == 0
    assert read_train_state(other / "final").step == 4
    assert [r["step"] for r in read_metrics(other) if r["split"] == "train"] == [3, 4]


def test_going_back_to_an_earlier_checkpoint_needs_overwrite_for_the_later_ones(tiny_corpus, finished):
    args = tiny_args(tiny_corpus, finished, *SHORT, "--resume-checkpoint", str(finished / "step-00000002"))
    with pytest.raises(ConfigError, match=r"also holds later checkpoints of this run \(.*step-00000004.*\)"):
        train(args)
    assert train([*args, "--overwrite", "--lr", "0.001"]) == 0  # e.g. back before a loss spike, lower lr
    assert read_train_state(finished / "final").config["lr"] == 0.001
    assert read_train_state(finished / "step-00000004").config["lr"] == 0.001  # rewritten, not the old one
    assert [r["step"] for r in read_metrics(finished) if r["split"] == "train"] == [1, 2, 3, 4]


def test_resume_with_nothing_saved_yet_starts_over_cleanly(tiny_corpus, tmp_path):
    """A requeued job that never reached its first checkpoint: --resume starts again; old records go."""
    run_dir = tmp_path / "run"
    assert train(tiny_args(tiny_corpus, run_dir, "--total-updates", "2", "--eval-interval-steps", "0")) == 0
    for folder in complete_checkpoints(run_dir):
        (folder / "train_state.json").unlink()  # as if killed before any save completed
    assert train(tiny_args(tiny_corpus, run_dir, "--total-updates", "2", "--resume")) == 0
    valid_steps = [r["step"] for r in read_metrics(run_dir) if r["split"] == "valid"]
    assert valid_steps.count(0) == 1  # the baseline evaluation appears once
