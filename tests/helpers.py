"""Helpers shared by the tests: documents that carry their own id, a tiny model, in-process training runs,
`accelerate launch` processes, and an independent check of an exported folder.

Fixtures (the session's tokenizer and corpus) are in conftest.py and corpus.py; everything here is a plain
function or constant.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch
import transformers
from accelerate import Accelerator
from safetensors.torch import load_file

from mpnet_dist.config import parse_config
from mpnet_dist.export.check import check_batch
from mpnet_dist.export.weights import load_checkpoint_model
from mpnet_dist.metrics import read_metrics
from mpnet_dist.model import MPNetConfig, MPNetForPretraining
from mpnet_dist.optim import build_optimizer
from mpnet_dist.train import run

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "launch_configs" / "accelerate"
NO_DROPOUT = ("--dropout", "0", "--attention-dropout", "0", "--activation-dropout", "0")

# ---- documents that carry their own id: "begin <digits as words> end <filler words>" -------------------------

DIGITS = "zero one two three four five six seven eight nine".split()
FILLER = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud".split()
_ID = re.compile(r"begin ((?:(?:zero|one|two|three|four|five|six|seven|eight|nine) )+)end")


def doc_text(doc_id: int, n_words: int | None = None) -> str:
    rng = random.Random(doc_id)
    n = rng.randint(3, 40) if n_words is None else n_words
    digits = " ".join(DIGITS[int(c)] for c in str(doc_id))
    return f"begin {digits} end " + " ".join(rng.choice(FILLER) for _ in range(n))


def doc_ids(text: str) -> list[int]:
    return [int("".join(str(DIGITS.index(w)) for w in m.split())) for m in _ID.findall(text)]


def write_docs(path: Path, ids: list[int], fmt: str = "txt") -> Path:
    lines = [json.dumps({"text": doc_text(i), "id": i}) if fmt == "jsonl" else doc_text(i) for i in ids]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def recover_rows(batch: dict) -> np.ndarray:
    """Original rows [B, L] of an MPNet batch: its first L slots are the row permuted by `positions`."""
    width = batch["input_ids"].shape[1] - 2 * batch["targets"].shape[1]
    ids, pos = batch["input_ids"][:, :width].numpy(), batch["positions"][:, :width].numpy()
    rows = np.empty_like(ids)
    np.put_along_axis(rows, pos, ids, axis=1)
    return rows


def make_cfg(**overrides) -> types.SimpleNamespace:
    cfg = dict(
        train_dir=None, valid_file=None, test_file=None, dataset_name=None, dataset_config=None,
        dataset_split="train", text_field="text", buffer_size=16, data_streams=None, eval_samples=0,
        min_text_length=1, max_tokens=32, batch_size=4, update_freq=1, num_workers=0, seed=7, packing=True,
        pred_prob=0.15, rand_prob=0.1, keep_prob=0.1, whole_word_mask=True, data_cache_dir=None,
    )  # fmt: skip
    cfg.update(overrides)
    return types.SimpleNamespace(**cfg)


# ---- a tiny model -------------------------------------------------------------------------------------------


def tiny_config(**overrides) -> MPNetConfig:
    settings = dict(
        vocab_size=128,
        encoder_layers=2,
        encoder_embed_dim=32,
        encoder_ffn_dim=64,
        encoder_attention_heads=4,
        max_positions=40,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )
    settings.update(overrides)
    return MPNetConfig(**settings)


def tiny_model(seed: int = 0, **overrides) -> MPNetForPretraining:
    torch.manual_seed(seed)
    model = MPNetForPretraining(tiny_config(**overrides))
    with torch.no_grad():  # move off the init so biases and LayerNorms matter
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


PAD = 1
TOKENIZER_VOCAB = 100  # ids drawn below this; the model's vocab is padded to 128


def random_batch(batch: int, seq_len: int, p: int, seed: int = 0):
    """A two-stream batch without padding: input_ids, positions [B, L+2p] (last p tokens predicted)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(5, TOKENIZER_VOCAB, (batch, seq_len), generator=gen)
    perm = torch.stack([torch.randperm(seq_len, generator=gen) for _ in range(batch)])
    masked = torch.randint(3, TOKENIZER_VOCAB, (batch, p), generator=gen)
    input_ids = torch.cat([tokens, masked, masked], dim=1)  # [B, L+2p]
    positions = torch.cat([perm, perm[:, -p:], perm[:, -p:]], dim=1)  # [B, L+2p]
    return input_ids, positions


# ---- training in this process -------------------------------------------------------------------------------


def reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons; in-process test runs need a clean slate each time."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def step_micro_batches(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`count` micro-batches of 3 two-stream rows (L=12, p=4) for train_step."""
    batches = []
    for index in range(count):
        input_ids, positions = random_batch(3, 12, 4, seed=seed + index)
        batches.append({"input_ids": input_ids, "positions": positions, "targets": input_ids[:, -4:].clone()})
    return batches


def prepared_step(update_freq: int, cpu: bool = True):
    """(accelerator, tiny model, fused AdamW), prepared for train_step with `update_freq` micro-batches."""
    reset_accelerate()
    accelerator = Accelerator(cpu=cpu, gradient_accumulation_steps=update_freq)
    model = tiny_model().train()
    optimizer = build_optimizer(model, parse_config(["--lr", "0.01", "--total-updates", "10"]))
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def tiny_args(corpus, run_dir: Path, *extra: str) -> list[str]:
    return [
        "--train-dir", str(corpus["train_dir"]), "--valid-file", str(corpus["valid"]),
        "--test-file", str(corpus["test"]), "--tokenizer-name", str(corpus["tokenizer"]),
        "--data-cache-dir", str(corpus["cache"]), "--checkpoint-dir", str(run_dir),
        "--max-tokens", "32", "--encoder-layers", "2", "--encoder-embed-dim", "32", "--encoder-ffn-dim", "64",
        "--encoder-attention-heads", "4", "--batch-size", "4", "--update-freq", "2", "--total-updates", "6",
        "--warmup-updates", "2", "--lr", "0.003", "--logging-steps", "1", "--eval-interval-steps", "3",
        "--dropout", "0.1", "--seed", "7", "--no-plot-curves", *extra,
    ]  # fmt: skip


def train(args: list[str]) -> int:
    reset_accelerate()
    return run(parse_config(args))


def final_weights(run_dir: Path, name: str = "final") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / name / "model.safetensors"))


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"}


# ---- `accelerate launch` processes --------------------------------------------------------------------------

# Variables a user should NOT need: the factory must do their job (DESIGN.md, "Distributed execution").
_NOT_NEEDED = ("ACCELERATE_USE_CPU", "DS_ACCELERATOR")


def launch_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _NOT_NEEDED and not k.startswith("ACCELERATE_")}
    env["MPNET_DIST_TIMEOUT_S"] = "120"  # a hung collective fails the test in minutes, not 30
    env.update(extra)
    return env


def launch_cmd(config: Path, args: list[str], *flags: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), *flags,
            "-m", "mpnet_dist.train", *args]  # fmt: skip


def start(config: Path, args: list[str], *flags: str, log: Path, **env: str) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        return subprocess.Popen(launch_cmd(config, args, *flags), cwd=REPO, env=launch_env(**env),
                                stdout=fh, stderr=subprocess.STDOUT)  # fmt: skip


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = "timeout"
    if code != 0:
        raise AssertionError(f"launch exited with {code}; last lines of {log}:\n{tail(log)}")


def tail(log: Path, lines: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no log)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_two_machines(config: Path, args: list[str], *flags: str, log_dir: Path, **env: str) -> list[tuple]:
    """Two `accelerate launch --num_machines 2` (one process each) on 127.0.0.1, as on two nodes."""
    common = ("--num_machines", "2", "--num_processes", "2", "--main_process_ip", "127.0.0.1",
              "--main_process_port", str(free_port()), *flags)  # fmt: skip
    logs = [log_dir / f"machine{rank}.log" for rank in (0, 1)]
    return [
        (start(config, args, *common, "--machine_rank", str(r), log=logs[r], **env), logs[r]) for r in (0, 1)
    ]


def finish_all(procs: list[tuple]) -> None:
    for proc, log in procs:
        finish(proc, log)


def train_state(run_dir: Path, name: str = "final") -> dict:
    return json.loads((run_dir / name / "train_state.json").read_text())


def weights(run_dir: Path, name: str = "final") -> dict[str, torch.Tensor]:
    """fp32 weights of a checkpoint: model.safetensors (DDP, 1 process) or the consolidated ZeRO shards."""
    folder = run_dir / name
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="pytorch_model")


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    shared = a.keys() & b.keys()
    assert len(shared) >= 0.9 * max(len(a), len(b)), (sorted(a), sorted(b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in shared)


def max_loss_diff(a: dict[int, float], b: dict[int, float], steps) -> float:
    return max(abs(a[s] - b[s]) for s in steps)


def full_state(checkpoint: Path, scratch: Path) -> tuple[dict[str, dict[str, torch.Tensor]], list[float]]:
    """({parameter: {fp32, exp_avg, exp_avg_sq, step}}, weight decay per param group) of a checkpoint, whole.

    DDP / one process: model.safetensors and optimizer.bin (torch AdamW's state by index, in the optimizer's
    group order). ZeRO-1/2/3 (fp32 or bf16): DeepSpeed's own ds_to_universal into `scratch`, independent of the
    loaders under test (zero_to_fp32 cannot read ZeRO-1 + bf16 shards).
    """
    import argparse
    import contextlib
    import io

    from mpnet_dist.optim import param_group_names

    if (checkpoint / "model.safetensors").is_file():
        weights_ = load_file(str(checkpoint / "model.safetensors"))
        optim = torch.load(checkpoint / "optimizer.bin", weights_only=True)
        with torch.device("meta"):
            model = MPNetForPretraining(
                MPNetConfig.from_dict(train_state(checkpoint.parent, checkpoint.name)["model_config"])
            )
        names = [n for group in param_group_names(model) for n in group]
        index = [i for group in optim["param_groups"] for i in group["params"]]
        state = {n: {"fp32": weights_[n], **optim["state"][i]} for n, i in zip(names, index, strict=True)}
        return state, [g["weight_decay"] for g in optim["param_groups"]]
    from deepspeed.checkpoint import ds_to_universal

    out = scratch / "universal"
    args = argparse.Namespace(input_folder=str(checkpoint / "pytorch_model"), output_folder=str(out),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)
    zero = out / "zero"
    optim = torch.load(zero / "optimizer_state.pt", weights_only=False)
    step = (
        optim.get("optimizer_state_dict", {}).get("state", {}).get(0, {}).get("step")
    )  # ZeRO-3: one for all
    state = {}
    for folder in (f for f in zero.iterdir() if f.is_dir()):
        entry = {}
        for file in folder.glob("*.pt"):
            value = torch.load(file, weights_only=False)
            entry[file.stem] = value["param"] if isinstance(value, dict) else value
        entry.setdefault("step", step)
        if "exp_avg" in entry:  # else a tied alias (lm_head.weight), written from the module's state dict
            state[folder.name] = entry
    return state, [g["weight_decay"] for g in optim["param_groups"]]


def max_state_diff(
    a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]
) -> dict[str, float]:
    """Largest |a - b| per kind of tensor (fp32, exp_avg, exp_avg_sq, step) over every parameter."""
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    return {
        key: max((a[n][key].float().flatten() - b[n][key].float().flatten()).abs().max().item() for n in a)
        for key in ("fp32", "exp_avg", "exp_avg_sq", "step")
    }


# ---- exports ------------------------------------------------------------------------------------------------


def assert_loads_and_matches(folder: Path, checkpoint: Path | MPNetForPretraining) -> float:
    """Independent of the exporter's own check: reload offline, no key problems, tied, same logits."""
    hf, info = transformers.AutoModelForMaskedLM.from_pretrained(
        str(folder), dtype=torch.float32, output_loading_info=True, local_files_only=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert hf.lm_head.decoder.weight.data_ptr() == hf.mpnet.embeddings.word_embeddings.weight.data_ptr()
    ours = checkpoint if isinstance(checkpoint, MPNetForPretraining) else load_checkpoint_model(checkpoint)[0]
    ids, mask = check_batch(ours.config, None)
    with torch.no_grad():
        diff = (ours.mlm_logits(ids, mask) - hf.eval()(input_ids=ids, attention_mask=mask).logits).abs()
    worst = diff[mask.bool()].max().item()
    assert worst < 1e-4, worst
    return worst


def assert_png_has_a_picture(path: Path) -> None:
    """A real picture: big enough, some ink, some colour (the curves), mostly white background."""
    from matplotlib.image import imread

    pixels = imread(str(path))[..., :3]  # [H, W, 3] floats in [0, 1]
    assert pixels.shape[0] > 300 and pixels.shape[1] > 600
    inked = (pixels < 0.9).any(axis=-1).mean()  # share of pixels that are not (near) white
    coloured = (np.ptp(pixels, axis=-1) > 0.2).mean()  # share of clearly coloured pixels
    assert 0.01 < inked < 0.6, inked
    assert coloured > 0.001, coloured
