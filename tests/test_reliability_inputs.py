"""Reliability: the NaN/Inf policy, bad inputs and unsafe files (no unpickling, no remote code).

RELIABILITY.md maps each acceptance item to the tests that show it (kills and writes: test_reliability_failures.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from mpnet_dist import step as step_module
from mpnet_dist import train as train_module
from mpnet_dist.checkpoint import CheckpointError, latest_checkpoint, read_train_state
from mpnet_dist.checkpoint.weights_only import deepspeed_engine_weights_only, refuse_pickles
from mpnet_dist.data import DataError, load_tokenizer
from tests.helpers import final_weights, tiny_args, train

# ---- 3. NaN / Inf policy -----------------------------------------------------------------------------------------


def _poison(monkeypatch, bad_calls: dict[int, float]) -> None:
    """Multiply the loss of the given training micro-batches (1-based, update-freq 2) by NaN or Inf."""
    real_loss, calls = step_module.batch_loss, {"n": 0}

    def poisoned(model, batch):
        calls["n"] += torch.is_grad_enabled()  # evaluation runs under no_grad and is not counted
        loss_sum, correct = real_loss(model, batch)
        factor = bad_calls.get(calls["n"]) if torch.is_grad_enabled() else None
        return (loss_sum * factor if factor is not None else loss_sum), correct

    monkeypatch.setattr(step_module, "batch_loss", poisoned)


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
    assert read_train_state(tmp_path / "resumed" / "final").model_config["encoder_layers"] == 2


@pytest.mark.parametrize("kind, message", [
    ("missing", "no such folder"),
    ("incomplete", "not a complete mpnet-dist checkpoint .*--resume to take the newest complete one"),
    ("pt_file", r"is a file.*mpnet-dist export .*--hf-model-path"),
    ("hf_folder", "is a Hugging Face model folder.*--hf-model-path"),
    ("no_rng_state", "random_states_0.pkl: missing, so the checkpoint .* is incomplete"),
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
    with pytest.raises(CheckpointError, match="is (damaged|incomplete)"):  # the manifest notices first
        _resume(tiny_corpus, tmp_path, checkpoint)
    _resign(checkpoint)  # as whoever planted the file could; the weights-only load must still refuse it
    with pytest.raises(CheckpointError, match=message):
        _resume(tiny_corpus, tmp_path, checkpoint)
    assert not marker.exists()
    torch.load(checkpoint / planted, weights_only=False)  # the control: the payload is live
    assert marker.exists()


def _resign(checkpoint: Path) -> None:
    """Rewrite train_state.json's manifest to match the folder's files as they are now."""
    from mpnet_dist.checkpoint.integrity import build_manifest

    state = json.loads((checkpoint / "train_state.json").read_text())
    state["manifest"] = build_manifest(checkpoint)
    (checkpoint / "train_state.json").write_text(json.dumps(state))


def test_trust_checkpoint_is_what_allows_unpickling(tiny_corpus, tmp_path, small_checkpoint):
    checkpoint, marker = _copy(small_checkpoint, tmp_path), tmp_path / "pwned"
    torch.save(_TouchOnLoad(marker), checkpoint / "data_state_rank0.pt")
    _resign(checkpoint)
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
        with refuse_pickles(shard), deepspeed_engine_weights_only(True):
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


def test_ctrl_c_saves_and_stops_then_resume_finishes(tiny_corpus, tmp_path, monkeypatch):
    """A first Ctrl-C saves at the next step boundary and stops cleanly; --resume then completes the run."""
    real_loss = step_module.batch_loss
    calls = {"n": 0}

    def interrupt_once(model, batch):
        calls["n"] += torch.is_grad_enabled()
        if calls["n"] == 3:  # during step 2 (update-freq 2)
            os.kill(os.getpid(), signal.SIGINT)
        return real_loss(model, batch)

    monkeypatch.setattr(step_module, "batch_loss", interrupt_once)
    previous = signal.getsignal(signal.SIGINT)
    run_dir = tmp_path / "run"
    assert train(tiny_args(tiny_corpus, run_dir, "--eval-interval-steps", "0")) == 0
    assert signal.getsignal(signal.SIGINT) is previous  # handlers given back
    assert (run_dir / "PREEMPTED").read_text().strip() == "3"  # the vote lands at the next boundary
    assert latest_checkpoint(run_dir).name == "step-00000003" and not (run_dir / "final").exists()
    monkeypatch.setattr(step_module, "batch_loss", real_loss)
    assert train(tiny_args(tiny_corpus, run_dir, "--eval-interval-steps", "0", "--resume")) == 0
    assert json.loads((run_dir / "final" / "train_state.json").read_text())["step"] == 6
