"""Reliability (issue 8): killed ranks and launchers, interrupted or failed checkpoint writes, NaN/Inf steps,
bad inputs and unsafe files. RELIABILITY.md maps each acceptance item to the tests that show it.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mpnet_dist import checkpoint as ckpt
from mpnet_dist import step as step_module
from mpnet_dist import train as train_module
from mpnet_dist.checkpoint import CheckpointError, latest_checkpoint
from mpnet_dist.data import DataError, load_tokenizer
from tests.test_distributed import CONFIGS, finish, launch_cmd, launch_env
from tests.test_train import final_weights, tiny_args, train, train_losses

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
    get SIGTERM from the kernel (train.stop_with_launcher), save, write PREEMPTED and exit 0."""
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
import mpnet_dist.checkpoint as c
slow, write = sys.argv.pop(1), c._write_json
def delayed(path, data):
    if slow in str(path):
        time.sleep(600)
    write(path, data)
c._write_json = delayed
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
    """_swap_into_place renames best -> .old-best, then .tmp-best -> best: a crash between leaves no best/."""

    def folder(path: Path, step: int) -> Path:
        path.mkdir()
        (path / ckpt.TRAIN_STATE).write_text(json.dumps({"step": step}))
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
        ckpt._swap_into_place(folder(tmp_path / ".tmp-best", 6), best)
    monkeypatch.undo()
    assert not best.exists() and ckpt.read_train_state(tmp_path / ".old-best")["step"] == 3
    shutil.rmtree(tmp_path / ".tmp-best")  # what save_checkpoint does first on the next save
    ckpt._swap_into_place(folder(tmp_path / ".tmp-best", 9), best)
    assert ckpt.read_train_state(best)["step"] == 9 and not (tmp_path / ".old-best").exists()


# ---- 3. NaN / Inf policy -----------------------------------------------------------------------------------------


def _poison(monkeypatch, bad_calls: dict[int, float]) -> None:
    """Multiply the loss of the given training micro-batches (1-based, update-freq 2) by NaN or Inf."""
    real_loss, calls = step_module.prediction_loss, {"n": 0}

    def poisoned(logits, targets):
        calls["n"] += torch.is_grad_enabled()  # evaluation runs under no_grad and is not counted
        loss_sum, correct = real_loss(logits, targets)
        factor = bad_calls.get(calls["n"]) if torch.is_grad_enabled() else None
        return (loss_sum * factor if factor is not None else loss_sum), correct

    monkeypatch.setattr(step_module, "prediction_loss", poisoned)


def test_transient_nonfinite_steps_are_skipped_without_touching_the_weights(
    tiny_corpus, tmp_path, monkeypatch
):
    _poison(monkeypatch, {6: math.inf, 7: math.nan})  # step 3's last micro-batch, step 4's first
    real_step, seen = train_module.train_step, []

    def watched(accelerator, model, optimizer, *args):
        params = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
        adam = [int(s["step"]) for s in optimizer.optimizer.state.values() if "step" in s]
        result = real_step(accelerator, model, optimizer, *args)
        after = accelerator.unwrap_model(model).state_dict()
        unchanged = all(torch.equal(params[k], after[k]) for k in params)
        seen.append(
            (result.skipped, unchanged, adam, [int(s["step"]) for s in optimizer.optimizer.state.values()])
        )
        return result

    monkeypatch.setattr(train_module, "train_step", watched)
    run_dir = tmp_path / "run"
    assert (
        train(tiny_args(tiny_corpus, run_dir, "--max-nonfinite-skips", "2", "--checkpoint-interval", "2"))
        == 0
    )
    assert [s[0] for s in seen] == [False, False, True, True, False, False]
    for index, (skipped, unchanged, adam_before, adam_after) in enumerate(seen):
        if skipped:  # neither the weights nor Adam's state move
            assert unchanged and adam_after == adam_before, index
        else:  # Adam steps; the weights move (except at the last step, where the schedule's lr is 0)
            assert adam_after == [n + 1 for n in adam_before] or not adam_before, index
            assert not unchanged or index == len(seen) - 1, index
    weights = final_weights(run_dir)
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert json.loads((run_dir / "final" / "train_state.json").read_text())["step"] == 6


def test_nonfinite_skips_are_bounded(tiny_corpus, tmp_path, monkeypatch):
    _poison(monkeypatch, {6: math.inf, 7: math.nan})  # two bad steps in a row, one allowed
    run_dir = tmp_path / "run"
    with pytest.raises(
        step_module.NonFiniteLossError, match=r"2 step\(s\) in a row \(limit --max-nonfinite-skips 1\)"
    ):
        train(tiny_args(tiny_corpus, run_dir, "--max-nonfinite-skips", "1", "--checkpoint-interval", "2",
                        "--eval-interval-steps", "0"))  # fmt: skip
    assert latest_checkpoint(run_dir) == run_dir / "step-00000002"  # step 4 (bad) was never saved
    assert all(torch.isfinite(t).all() for t in final_weights(run_dir, "step-00000002").values())


# ---- 4. bad inputs not covered by tests/test_data_*.py and tests/test_train.py (see RELIABILITY.md) ----------


@pytest.fixture(scope="module")
def small_checkpoint(tiny_corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("small") / "run"
    assert train(tiny_args(tiny_corpus, run_dir, "--total-updates", "2", "--checkpoint-interval", "2")) == 0
    return run_dir / "step-00000002"


def _resume(corpus, tmp_path: Path, checkpoint: Path | str, *extra: str) -> int:
    args = tiny_args(
        corpus, tmp_path / "resumed", "--resume-checkpoint", str(checkpoint), "--total-updates", "3"
    )
    return train([*args, *extra])


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(checkpoint, tmp_path / "copy"))


def test_resume_with_a_tokenizer_of_another_size_is_refused(tiny_corpus, tmp_path, small_checkpoint):
    from mpnet_dist.data import train_tokenizer

    texts = (tiny_corpus["train_dir"] / "part1.txt").read_text().splitlines()
    other = train_tokenizer(texts, tmp_path / "tok", vocab_size=400)
    with pytest.raises(
        DataError, match=r"has \d+ tokens but the checkpoint was trained with a \d+-token .*--tokenizer-name"
    ):
        _resume(tiny_corpus, tmp_path, small_checkpoint, "--tokenizer-name", str(other))


def test_resume_with_other_architecture_flags_keeps_the_checkpoint_model(
    tiny_corpus, tmp_path, small_checkpoint, capsys
):
    assert _resume(tiny_corpus, tmp_path, small_checkpoint, "--encoder-layers", "3") == 0
    assert "flags ignored for: encoder_layers" in capsys.readouterr().out
    assert ckpt.read_train_state(tmp_path / "resumed" / "final")["model_config"]["encoder_layers"] == 2


@pytest.mark.parametrize("kind, message", [
    ("missing", "no such folder"),
    ("incomplete", "not a complete mpnet-dist checkpoint .*--resume to take the newest complete one"),
    ("pt_file", r"is a file.*mpnet-dist export .*--hf-model-path"),
    ("hf_folder", "is a Hugging Face model folder.*--hf-model-path"),
    ("no_rng_state", "lacks random_states_0.pkl.*damaged.*another checkpoint"),
])  # fmt: skip
def test_resume_from_something_else_names_the_fix(kind, message, tiny_corpus, tmp_path, small_checkpoint):
    target = tmp_path / kind
    if kind == "incomplete":  # a save killed before train_state.json
        target = _copy(small_checkpoint, tmp_path)
        (target / "train_state.json").unlink()
    elif kind == "pt_file":  # annotated-mpnet's format
        torch.save({"args": {}, "model_states": {}}, target)
    elif kind == "hf_folder":
        target.mkdir()
        (target / "config.json").write_text(json.dumps({"model_type": "bert"}))
    elif kind == "no_rng_state":
        target = _copy(small_checkpoint, tmp_path)
        (target / "random_states_0.pkl").unlink()
    with pytest.raises(CheckpointError, match=message):
        _resume(tiny_corpus, tmp_path, target)


@pytest.mark.xfail(reason="model/hf.py from_hf loads any model_type into MPNet, initializing every weight afresh "
                   "(reported in RELIABILITY.md)", strict=False)  # fmt: skip
def test_hf_model_path_of_another_family_is_refused(tmp_path):
    import transformers

    from mpnet_dist.model import from_hf

    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64)  # fmt: skip
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path / "bert")
    with pytest.raises((ValueError, TypeError), match="(?i)bert"):
        from_hf(str(tmp_path / "bert"))


# ---- 5. unsafe files: no unpickling without --trust-checkpoint, no remote code, export stays in its folder -----


class _TouchOnLoad:
    """Unpickling this calls open(marker, "w"): a stand-in for the arbitrary code a planted pickle can run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("planted, message", [
    ("optimizer.bin", "--trust-checkpoint"),
    ("data_state_rank0.pt", "--trust-checkpoint"),
    ("pytorch_model.bin", "--trust-checkpoint"),  # in place of model.safetensors
    ("random_states_0.pkl", "not even with --trust-checkpoint"),  # Accelerate used to skip it silently
])  # fmt: skip
def test_planted_pickle_is_refused_and_never_runs(planted, message, tiny_corpus, tmp_path, small_checkpoint):
    checkpoint, marker = _copy(small_checkpoint, tmp_path), tmp_path / "pwned"
    if planted == "pytorch_model.bin":
        (checkpoint / "model.safetensors").unlink()
    torch.save(_TouchOnLoad(marker), checkpoint / planted)
    with pytest.raises(CheckpointError, match=message):
        _resume(tiny_corpus, tmp_path, checkpoint)
    assert not marker.exists()
    torch.load(checkpoint / planted, weights_only=False)  # the control: the payload is live
    assert marker.exists()


def test_trust_checkpoint_is_what_allows_unpickling(tiny_corpus, tmp_path, small_checkpoint):
    checkpoint, marker = _copy(small_checkpoint, tmp_path), tmp_path / "pwned"
    torch.save(_TouchOnLoad(marker), checkpoint / "data_state_rank0.pt")
    with pytest.raises(Exception):  # noqa: B017  (the payload is not a data state)
        _resume(tiny_corpus, tmp_path, checkpoint, "--trust-checkpoint")
    assert marker.exists()


def test_deepspeed_checkpoint_engine_is_made_weights_only(tmp_path):
    """DeepSpeed's engine loads its shards with weights_only=False; resume wraps it (ZeRO runs: test_distributed)."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    shard, marker = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt", tmp_path / "pwned"
    torch.save(_TouchOnLoad(marker), shard)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        with ckpt._refuse_pickles(shard), ckpt._deepspeed_weights_only(True):
            TorchCheckpointEngine().load(str(shard))
    assert not marker.exists()
    TorchCheckpointEngine().load(str(shard))  # unwrapped, as with --trust-checkpoint
    assert marker.exists()


def test_tokenizer_needing_custom_code_is_refused_without_running_it(tiny_corpus, tmp_path, capsys):
    folder, marker = Path(shutil.copytree(tiny_corpus["tokenizer"], tmp_path / "tok")), tmp_path / "pwned"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w')\nfrom transformers import MPNetTokenizer as EvilTokenizer\n"
    )
    with pytest.raises(DataError, match="trust_remote_code"):
        load_tokenizer(str(folder))
    assert not marker.exists()


def test_dataset_script_is_refused_without_running_it(tmp_path):
    from mpnet_dist.data.sources import open_stream

    marker = tmp_path / "pwned"
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "ds.py").write_text(f"open({str(marker)!r}, 'w')\n")  # a loading script
    with pytest.raises(DataError, match="scripts are no longer supported"):
        open_stream(str(tmp_path / "ds"), None, None, "text")
    assert not marker.exists()


@pytest.mark.xfail(reason="data/tokenizer.py leaves trust_remote_code unset, so transformers prompts on a TTY "
                   "(reported in RELIABILITY.md)", strict=False)  # fmt: skip
def test_tokenizer_needing_custom_code_never_prompts(tiny_corpus, tmp_path, capsys):
    test_tokenizer_needing_custom_code_is_refused_without_running_it(tiny_corpus, tmp_path, capsys)
    assert "Do you wish to run the custom code" not in capsys.readouterr().out


def test_export_writes_only_its_output_folder(tiny_corpus, tmp_path, small_checkpoint):
    from mpnet_dist.export import export_checkpoint

    def tree(root: Path) -> dict[str, int]:
        return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}

    run_dir = small_checkpoint.parent
    before_run, before_tmp = tree(run_dir), tree(tmp_path)
    export_checkpoint(small_checkpoint, tmp_path / "exports" / "hf")
    assert tree(run_dir) == before_run  # the checkpoint is only read
    created = set(tree(tmp_path)) - set(before_tmp)
    outside = sorted(p for p in created if not p.startswith(str(tmp_path / "exports" / "hf")))
    assert outside == [str(tmp_path / "exports")], outside
