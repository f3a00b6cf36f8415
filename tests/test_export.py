"""Export to Hugging Face: every checkpoint kind, verification, refusals, round trip, both CLIs.

Real runs: one 2-process ZeRO-3 training (module fixture, also exercises the end-of-training export), one
ZeRO-2 and one DDP run; single-process checkpoints come from in-process training or the real save path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from mpnet_dist.checkpoint import BlocksDataState, TrainState, save_checkpoint
from mpnet_dist.export import INFO_FILE, convert_to_hf_main, main
from mpnet_dist.export.weights import load_checkpoint_model
from mpnet_dist.model import MPNetConfig, MPNetForPretraining
from tests.helpers import assert_loads_and_matches, reset_accelerate, tiny_args, train

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "launch_configs" / "accelerate"
VOCAB = 640  # the 600-token test tokenizer, padded to a multiple of 128
TINY = dict(vocab_size=VOCAB, encoder_layers=2, encoder_embed_dim=32, encoder_ffn_dim=64, encoder_attention_heads=4,
            max_positions=32)  # fmt: skip


def launch_training(config: str, args: list[str], log: Path) -> None:
    """`accelerate launch --config_file CONFIG -m mpnet_dist.train ARGS` on 2 CPU processes."""
    env = dict(
        os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(REPO)
    )
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
           str(CONFIGS / config), "--main_process_port", "0", "-m", "mpnet_dist.train", *args]  # fmt: skip
    started = time.perf_counter()
    with open(log, "w") as fh:
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=400)
    print(f"{config}: {time.perf_counter() - started:.1f}s")
    assert done.returncode == 0, log.read_text()[-4000:]


def export(*args: object) -> int:
    return main([str(a) for a in args])


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    model = transformers.AutoModelForMaskedLM.from_pretrained(str(folder), dtype=torch.float32)
    return model.state_dict()


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# The data state of a checkpoint the tests write by hand (export never reads it).
NO_DATA = BlocksDataState(blocks_consumed=0, n_blocks=1, data_id="none", seed=0, world_size=1, batch_size=1)


def hand_checkpoint(run_dir: Path, tokenizer: Path, seed: int = 0, **overrides: object) -> Path:
    """A single-process checkpoint written by the real save path (Accelerator + save_checkpoint)."""
    from accelerate import Accelerator

    reset_accelerate()
    torch.manual_seed(seed)
    config = MPNetConfig(**{**TINY, **overrides})
    model = MPNetForPretraining(config)
    with torch.no_grad():  # off the init, so biases and LayerNorms matter
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(model)
    state = TrainState(
        step=3, model_config=config.to_dict(), tokenizer_name=str(tokenizer), tokenizer_size=600
    )
    return save_checkpoint(accelerator, run_dir, "final", state, NO_DATA)


@pytest.fixture(scope="module")
def zero3_run(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("zero3")
    run_dir, exported = root / "run", root / "exported"
    args = tiny_args(tiny_corpus, run_dir, "--checkpoint-interval", "3", "--export-hf-dir", str(exported))
    launch_training("deepspeed_zero3.yaml", args, root / "train.log")
    return run_dir, exported


def test_zero3_end_of_training_export_equals_offline_export(zero3_run, tmp_path):
    run_dir, exported = zero3_run
    state = json.loads((run_dir / "final" / "train_state.json").read_text())
    assert state["zero_stage"] == 3 and state["world_size"] == 2
    assert (run_dir / "final" / "pytorch_model").is_dir() and not (
        run_dir / "final" / "model.safetensors"
    ).exists()
    info = json.loads((exported / INFO_FILE).read_text())
    assert info["source"] == "end of training" and info["max_abs_diff"] <= info["tolerance"]
    # live gather (safe_get_full_fp32_param on 2 ranks) == offline zero_to_fp32 consolidation, bit for bit
    assert export(run_dir, tmp_path / "offline") == 0
    assert_same_tensors(
        load_file(exported / "model.safetensors"), load_file(tmp_path / "offline" / "model.safetensors")
    )
    assert_loads_and_matches(exported, run_dir / "final")


@pytest.mark.parametrize("name", ["step-00000003", "best"])
def test_every_zero3_checkpoint_exports(zero3_run, tmp_path, name):
    run_dir, exported = zero3_run
    assert export(run_dir / name, tmp_path / "out") == 0
    assert_loads_and_matches(tmp_path / "out", run_dir / name)
    if name == "step-00000003":  # a different point of training, not final's weights again
        a, b = load_file(tmp_path / "out" / "model.safetensors"), load_file(exported / "model.safetensors")
        assert not torch.equal(a["lm_head.bias"], b["lm_head.bias"])


def test_exported_config_and_tokenizer_are_right(zero3_run, tiny_corpus):
    _, exported = zero3_run
    cfg = json.loads((exported / "config.json").read_text())
    expected = {"architectures": ["MPNetForMaskedLM"], "model_type": "mpnet", "vocab_size": VOCAB,
                "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
                "hidden_act": "gelu", "max_position_embeddings": 32 + 2, "layer_norm_eps": 1e-5,
                "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
                "relative_attention_num_buckets": 32, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
                "tie_word_embeddings": True, "dtype": "float32"}  # fmt: skip
    assert {k: cfg.get(k) for k in expected} == expected
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(exported), local_files_only=True)
    original = transformers.AutoTokenizer.from_pretrained(str(tiny_corpus["tokenizer"]))
    text = "Return a new dictionary initialized from an optional positional argument."
    assert tokenizer(text)["input_ids"] == original(text)["input_ids"]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 0, 2)
    assert tokenizer.mask_token_id == len(tokenizer) - 1 and tokenizer.model_max_length == 32


@pytest.mark.parametrize("config", ["deepspeed_zero2.yaml", "cpu_2proc.yaml"], ids=["zero2", "ddp"])
def test_two_process_checkpoint_exports(tiny_corpus, tmp_path, config):
    run_dir = tmp_path / "run"
    launch_training(config, tiny_args(tiny_corpus, run_dir, "--total-updates", "2"), tmp_path / "train.log")
    state = json.loads((run_dir / "final" / "train_state.json").read_text())
    assert state["world_size"] == 2 and state["zero_stage"] == (2 if "zero2" in config else 0)
    assert export(run_dir / "final", tmp_path / "out") == 0
    assert_loads_and_matches(tmp_path / "out", run_dir / "final")


def test_single_process_run_dir_and_bf16(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    assert train(tiny_args(tiny_corpus, run_dir, "--checkpoint-interval", "3")) == 0
    assert "lm_head.weight" not in load_file(run_dir / "final" / "model.safetensors")  # Accelerate dropped it
    assert export(run_dir, tmp_path / "fp32") == 0  # a run directory means its final checkpoint
    assert json.loads((tmp_path / "fp32" / INFO_FILE).read_text())["source"] == str(run_dir / "final")
    worst = assert_loads_and_matches(tmp_path / "fp32", run_dir / "final")
    print(f"fp32 export, independent check: max |logit diff| {worst:.3g}")

    assert export(run_dir / "step-00000003", tmp_path / "bf16", "--dtype", "bfloat16") == 0
    stored = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    fp32 = load_checkpoint_model(run_dir / "step-00000003")[0].state_dict()
    emb = stored["mpnet.embeddings.word_embeddings.weight"]
    assert torch.equal(emb, fp32["sentence_encoder.embed_tokens.weight"].bfloat16())
    info = json.loads((tmp_path / "bf16" / INFO_FILE).read_text())
    assert (
        info["dtype"] == "bfloat16"
        and info["max_abs_diff"] < 1e-4
        and info["bf16_native_max_abs_diff"] < 0.05
    )


def test_round_trip_from_hf_folder_after_zero_steps(tiny_corpus, tmp_path):
    """--hf-model-path folder -> checkpoint as training writes it -> export: the same tensors come back."""
    from mpnet_dist.config import parse_config
    from mpnet_dist.data import load_tokenizer
    from mpnet_dist.distributed import build_accelerator, zero_stage
    from mpnet_dist.model_setup import build_model
    from mpnet_dist.optim import build_optimizer

    torch.manual_seed(1)
    hf_cfg = transformers.MPNetConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=34, layer_norm_eps=1e-12,
                                      bos_token_id=0, eos_token_id=2, pad_token_id=1)  # fmt: skip
    original = transformers.MPNetForMaskedLM(hf_cfg)
    with torch.no_grad():
        for param in original.parameters():
            param.add_(0.05 * torch.randn_like(param))
    original.save_pretrained(tmp_path / "hf")

    reset_accelerate()
    cfg = parse_config(tiny_args(tiny_corpus, tmp_path / "run", "--hf-model-path", str(tmp_path / "hf")))
    accelerator = build_accelerator(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer_name)
    model = build_model(cfg, tokenizer, None)
    model, _ = accelerator.prepare(model, build_optimizer(model, cfg))
    state = TrainState(step=0, model_config=accelerator.unwrap_model(model).config.to_dict(),
                       tokenizer_name=cfg.tokenizer_name, tokenizer_size=len(tokenizer),
                       zero_stage=zero_stage(accelerator), config=cfg.to_dict())  # fmt: skip
    checkpoint = save_checkpoint(accelerator, tmp_path / "run", "final", state, NO_DATA)

    assert export(checkpoint, tmp_path / "out") == 0
    assert_same_tensors(original.state_dict(), hf_tensors(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["layer_norm_eps"] == 1e-12


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"normalize_before": True}, "normalize_before"),
        ({"relative_attention_num_buckets": 64}, "relative_attention_num_buckets"),
        ({"relative_attention_max_distance": 256}, "relative_attention_max_distance"),
        ({"padding_idx": 0}, "padding_idx"),
        ({"activation_fn": "relu"}, "activation_fn"),
    ],
)
def test_unexportable_settings_refused_before_writing(tiny_corpus, tmp_path, capsys, override, named):
    checkpoint = hand_checkpoint(tmp_path / "run", tiny_corpus["tokenizer"], **override)
    assert export(checkpoint, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "HFExportError" not in err and named in err and "cannot be exported" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written, not even a temp folder


def test_failed_verification_fails_loudly(tiny_corpus, tmp_path, capsys, monkeypatch):
    """An exporter bug (here: a perturbed relative-bias table, like the wrong-bucket bug) is caught."""
    import mpnet_dist.export.folder as export_module

    real_to_hf = export_module.to_hf

    def broken_to_hf(*args, **kwargs):
        hf = real_to_hf(*args, **kwargs)
        with torch.no_grad():
            hf.mpnet.encoder.relative_attention_bias.weight[20:] += 0.5
        return hf

    monkeypatch.setattr(export_module, "to_hf", broken_to_hf)
    checkpoint = hand_checkpoint(tmp_path / "run", tiny_corpus["tokenizer"])
    assert export(checkpoint, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "computes different MLM logits" in err and "out.failed" in err
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "out.failed" / "EXPORT_FAILED.txt").is_file()


def test_convert_to_hf_reference_flags(tiny_corpus, tmp_path):
    checkpoint = hand_checkpoint(tmp_path / "run", tiny_corpus["tokenizer"])
    args = ["--mpnet-checkpoint-path", str(checkpoint), "--hf-model-folder-path", str(tmp_path / "out")]
    assert convert_to_hf_main([*args, "--no-save-tokenizer"]) == 0
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    assert_loads_and_matches(tmp_path / "out", checkpoint)
    assert convert_to_hf_main(args) == 0  # replaces its own earlier export, now with the tokenizer
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_clear_errors_for_bad_inputs(tiny_corpus, tmp_path, capsys):
    checkpoint = hand_checkpoint(tmp_path / "run", tiny_corpus["tokenizer"])
    (tmp_path / "run" / "step-00000009").mkdir()  # interrupted save: no train_state.json
    assert export(tmp_path / "run" / "step-00000009", tmp_path / "a") == 1
    assert "not a complete mpnet-dist checkpoint" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    assert export(checkpoint, tmp_path / "busy") == 1
    assert "not an mpnet-dist export" in capsys.readouterr().err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
    assert export(checkpoint, tmp_path / "b", "--tokenizer-name", str(tmp_path / "missing")) == 1
    assert "could not be loaded" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export(checkpoint, tmp_path / "c", "--dtype", "float16")


def test_convert_to_hf_reads_reference_pt_files(tiny_corpus, tmp_path, capsys):
    """annotated-mpnet's `{"args", "model_states"}` .pt (same parameter names, maybe `_orig_mod.`-prefixed)."""
    torch.manual_seed(2)
    model = MPNetForPretraining(MPNetConfig(**TINY)).eval()
    args = {"encoder_layers": 2, "encoder_embed_dim": 32, "encoder_ffn_dim": 64, "encoder_attention_heads": 4,
            "dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.1, "activation_fn": "gelu",
            "max_positions": None, "max_tokens": 32, "relative_attention_num_buckets": None,
            "relative_attention_max_distance": None, "normalize_before": False,
            "tokenizer_name": str(tiny_corpus["tokenizer"])}  # fmt: skip
    states = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    torch.save({"args": args, "model_states": states, "steps": 100, "rng_state": {"torch": torch.get_rng_state()}},
               tmp_path / "best_checkpoint.pt")  # fmt: skip
    cli = ["--mpnet-checkpoint-path", str(tmp_path / "best_checkpoint.pt"), "--hf-model-folder-path"]
    assert convert_to_hf_main([*cli, str(tmp_path / "out")]) == 0
    assert_loads_and_matches(tmp_path / "out", model)
    assert (tmp_path / "out" / "tokenizer.json").is_file()

    capsys.readouterr()
    torch.save(
        {"args": {**args, "activation_fn": "gelu_accurate"}, "model_states": states}, tmp_path / "gelu.pt"
    )
    cli[1] = str(tmp_path / "gelu.pt")
    assert convert_to_hf_main([*cli, str(tmp_path / "out2")]) == 1
    assert "activation_fn='gelu_accurate'" in capsys.readouterr().err and not (tmp_path / "out2").exists()
