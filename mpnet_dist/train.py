"""Training entry point: `accelerate launch -m mpnet_dist.train ARGS` (or `python -m mpnet_dist.train ARGS`).

Builds everything in order (accelerator, tokenizer, model, optimizer, data), restores a checkpoint if asked,
then runs optimizer steps until --total-updates, evaluating, checkpointing and logging on the way.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed

from mpnet_dist import __version__
from mpnet_dist.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    read_train_state,
    save_checkpoint,
    step_name,
)
from mpnet_dist.compilation import check_compile_supported, compile_model, log_compile_time
from mpnet_dist.config import ConfigError, TrainConfig, dump_yaml, parse_config
from mpnet_dist.distributed import build_accelerator, describe, zero_stage
from mpnet_dist.host_memory import keep_freed_memory
from mpnet_dist.metrics import MetricsWriter, console_line, read_metrics, setup_logging
from mpnet_dist.model_setup import build_model
from mpnet_dist.optim import build_optimizer, lr_at
from mpnet_dist.step import NonFiniteLossError, StepSettings, evaluate, train_step
from mpnet_dist.stopping import PREEMPT_FILE, PREEMPTED_MARKER, StopSignal, stop_with_launcher

logger = logging.getLogger("mpnet_dist")


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0  # non-padding input tokens, all ranks
    pred_tokens: int = 0  # predicted tokens, all ranks
    best_valid_loss: float = math.inf
    elapsed_s: float = 0.0
    last_eval_step: int = -1
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "pred_tokens": self.pred_tokens,
            "best_valid_loss": self.best_valid_loss if math.isfinite(self.best_valid_loss) else None,
            "elapsed_s": self.elapsed_s,
            **self.extra,
        }


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
    except ConfigError as err:
        print(f"mpnet-dist train: error: {err}", file=sys.stderr)
        return 2
    return run(cfg)


def resolve_resume(cfg: TrainConfig, run_dir: Path) -> Path | None:
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
        if not (path / "train_state.json").is_file() and (path / "config.json").is_file():
            raise CheckpointError(
                f"--resume-checkpoint {path} is a Hugging Face model folder, not an mpnet-dist checkpoint: to "
                f"start from its weights use --hf-model-path {path} (a new run, fresh optimizer) instead."
            )
        read_train_state(path)  # raises with a clear message when incomplete
        return path
    if cfg.resume:
        found = latest_checkpoint(run_dir)
        if found is None and run_dir.is_dir() and any(run_dir.glob("*.pt")):
            logger.warning(
                "--resume: %s holds .pt files but no mpnet-dist checkpoint; annotated-mpnet checkpoints cannot "
                "be resumed: export one (`mpnet-dist export FILE.pt OUT`) and start from --hf-model-path OUT",
                run_dir,
            )
        return found
    return None


def run(cfg: TrainConfig) -> int:
    stop_with_launcher()
    accelerator = build_accelerator(cfg)
    setup_logging(accelerator.is_main_process, cfg.debug)
    if accelerator.device.type == "cpu":
        keep_freed_memory()
    run_dir = Path(cfg.checkpoint_dir)
    resume_from = resolve_resume(cfg, run_dir)
    if cfg.resume and resume_from is None:
        logger.info("--resume: no complete checkpoint in %s, starting from scratch", run_dir)
    logger.info("mpnet-dist %s: %s", __version__, describe(accelerator))
    set_seed(cfg.seed)  # the same initial weights on every rank

    from mpnet_dist.data import build_data, check_vocab, load_tokenizer

    tokenizer = load_tokenizer(cfg.tokenizer_name, cfg.data_cache_dir)
    saved = read_train_state(resume_from) if resume_from else None
    if saved is not None:
        check_vocab(tokenizer, saved["tokenizer_size"])
    model = build_model(cfg, tokenizer, saved)
    # Same weights everywhere, but each rank its own dropout masks (seed + rank); a resumed run restores
    # every rank's RNG from the checkpoint instead.
    set_seed(cfg.seed, device_specific=True)
    if cfg.export_hf_dir:
        from mpnet_dist.export import check_exportable

        check_exportable(model.config)  # refuse now, not after days of training
    optimizer = build_optimizer(model, cfg)
    data = build_data(cfg, tokenizer, accelerator.process_index, accelerator.num_processes)
    logger.info("data: %s", getattr(data, "source_info", "ready"))
    if cfg.compile:
        check_compile_supported(zero_stage(accelerator))
        compile_model(model, accelerator.device, cfg.compile_backend)
    model, optimizer = accelerator.prepare(model, optimizer)

    state = _restore(accelerator, data, resume_from, cfg.trust_checkpoint) if resume_from else TrainState()
    state.extra = {
        "model_config": accelerator.unwrap_model(model).config.to_dict(),
        "tokenizer_name": cfg.tokenizer_name,
        "tokenizer_size": len(tokenizer),
        "zero_stage": zero_stage(accelerator),
        "distributed_type": str(accelerator.distributed_type),
        "mpnet_dist_version": __version__,
        "config": cfg.to_dict(),
    }
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, run_dir / "config.yaml")
        _truncate_metrics(run_dir, state.step)
        (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        (run_dir / PREEMPT_FILE).unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    writer = MetricsWriter(cfg, run_dir, accelerator.is_main_process)
    if cfg.wandb_watch and writer.wandb is not None:
        writer.wandb.watch(accelerator.unwrap_model(model), log_freq=100)
    try:
        return _train_loop(cfg, accelerator, model, optimizer, data, state, writer, run_dir, resume_from)
    finally:
        writer.close()


def _restore(accelerator, data, resume_from: Path, trust: bool) -> TrainState:
    """Load the checkpoint into the prepared model/optimizer and the data loader; return the train state."""
    train_state, data_state = load_checkpoint(accelerator, resume_from, trust=trust)
    if data_state is not None:
        data.train.load_state_dict(data_state)
    best = train_state["best_valid_loss"]
    logger.info("resumed from %s at step %d", resume_from, train_state["step"])
    return TrainState(
        step=train_state["step"],
        tokens=train_state["tokens"],
        pred_tokens=train_state["pred_tokens"],
        best_valid_loss=best if best is not None else math.inf,
        elapsed_s=train_state.get("elapsed_s", 0.0),
        last_eval_step=train_state["step"],
    )


def _truncate_metrics(run_dir: Path, step: int) -> None:
    """A resumed run re-does the steps after its checkpoint: drop their old records so each step appears once."""
    records = read_metrics(run_dir)
    kept = [r for r in records if r["step"] <= step]
    if len(kept) != len(records):
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))


def _train_loop(cfg, accelerator, model, optimizer, data, state, writer, run_dir, resume_from) -> int:
    from mpnet_dist.data.prefetch import Prefetcher

    stop = StopSignal(run_dir)
    if cfg.prefetch_steps:  # after the restore: it reads the source's state as its starting point
        data.train = Prefetcher(data.train, cfg.prefetch_steps * cfg.update_freq, accelerator.device)
    try:
        return _run_steps(cfg, accelerator, model, optimizer, data, state, writer, run_dir, resume_from, stop)
    finally:
        stop.close()
        if isinstance(data.train, Prefetcher):
            data.train.close()


def _run_steps(cfg, accelerator, model, optimizer, data, state, writer, run_dir, resume_from, stop) -> int:
    from tqdm.auto import tqdm

    warmup, eval_every = cfg.resolved_warmup(), cfg.resolved_eval_interval()
    bar = tqdm(
        total=cfg.total_updates,
        initial=state.step,
        disable=not accelerator.is_main_process,
        desc="train",
        dynamic_ncols=True,
        leave=False,
    )
    window = _Window()
    nonfinite_run, first_step = 0, True
    if state.step == 0 and cfg.total_updates > 0:
        # The untrained model's validation loss: the baseline every later evaluation is read against.
        result = evaluate(accelerator, model, data.valid)
        if result is not None:
            _write_eval(writer, state, "valid", result)
    model.train()
    while state.step < cfg.total_updates:
        started = time.perf_counter()
        micro_batches = [next(data.train) for _ in range(cfg.update_freq)]
        window.data_wait += time.perf_counter() - started
        lr = lr_at(state.step + 1, cfg.lr, warmup, cfg.total_updates, cfg.end_learning_rate, cfg.power)
        logs = (state.step + 1) % cfg.logging_steps == 0 or state.step + 1 == cfg.total_updates
        settings = StepSettings(lr, cfg.clip_grad_norm, stop_vote=stop.poll(), read_grad_norm=logs)
        result = train_step(accelerator, model, optimizer, micro_batches, settings)
        if result.skipped:
            nonfinite_run += 1
            logger.warning(
                "step %d: non-finite loss, update skipped (%d in a row)", state.step + 1, nonfinite_run
            )
            if nonfinite_run > cfg.max_nonfinite_skips:
                raise NonFiniteLossError(
                    f"loss was NaN/Inf for {nonfinite_run} step(s) in a row (limit --max-nonfinite-skips "
                    f"{cfg.max_nonfinite_skips}); stopped without saving. The last good checkpoint in {run_dir} "
                    "is intact: resume from it with a lower --lr or stronger --clip-grad-norm."
                )
        else:
            nonfinite_run = 0
        state.step += 1
        seconds = time.perf_counter() - started
        if cfg.compile and first_step:  # this process compiled during this step
            log_compile_time(seconds)
        first_step = False
        state.tokens += result.n_tokens_global
        state.pred_tokens += result.n_pred_global
        state.elapsed_s += seconds
        window.add(result, lr, seconds)
        bar.update(1)
        if state.step % cfg.logging_steps == 0 or state.step == cfg.total_updates:
            _log_train(accelerator, cfg, state, window, writer, bar)
            window = _Window()
        if state.step % eval_every == 0 and state.step < cfg.total_updates:
            _validate(accelerator, cfg, model, data, state, writer, run_dir, bar)
        if cfg.checkpoint_interval > 0 and state.step % cfg.checkpoint_interval == 0:
            _save(accelerator, data, state, run_dir, step_name(state.step))
            if accelerator.is_main_process:
                prune_checkpoints(run_dir, cfg.keep_checkpoints, protect=resume_from)
        if result.stop_requested and state.step < cfg.total_updates:
            if not (cfg.checkpoint_interval > 0 and state.step % cfg.checkpoint_interval == 0):
                _save(accelerator, data, state, run_dir, step_name(state.step))
            if accelerator.is_main_process:
                (run_dir / PREEMPTED_MARKER).write_text(f"{state.step}\n")
            logger.info("stop requested: saved step %d and exiting; resume with --resume", state.step)
            bar.close()
            return 0
    bar.close()
    if state.last_eval_step != state.step:
        _validate(accelerator, cfg, model, data, state, writer, run_dir, bar)
    test = evaluate(accelerator, model, data.test)
    if test is not None:
        _write_eval(writer, state, "test", test)
    _save(accelerator, data, state, run_dir, "final")
    if cfg.export_hf_dir:
        from mpnet_dist.export import export_from_training

        export_from_training(accelerator, model, cfg, Path(cfg.export_hf_dir))
    logger.info("done: %d steps, %s tokens in %.0fs", state.step, f"{state.tokens:,}", state.elapsed_s)
    return 0


class _Window:
    """Sums over the steps since the last log line (loss sums stay on device until then)."""

    def __init__(self):
        self.loss = self.correct = None
        self.n_pred = self.n_tokens = self.steps = 0
        self.seconds = self.data_wait = 0.0
        self.lr, self.grad_norm = 0.0, None

    def add(self, result, lr: float, seconds: float) -> None:
        self.loss = result.loss_sum if self.loss is None else self.loss + result.loss_sum
        self.correct = result.correct if self.correct is None else self.correct + result.correct
        self.n_pred += result.n_pred_global
        self.n_tokens += result.n_tokens_global
        self.steps += 1
        self.seconds += seconds
        self.lr = lr
        if result.grad_norm is not None:
            self.grad_norm = result.grad_norm


def _log_train(accelerator, cfg, state, window: _Window, writer, bar) -> None:
    sums = torch.stack([window.loss.double(), window.correct.double()])
    loss, correct = accelerator.reduce(sums, reduction="sum").tolist()  # host sync: log steps only
    n_pred = max(window.n_pred, 1)
    record = {
        "step": state.step,
        "split": "train",
        "loss": loss / n_pred,
        "acc": correct / n_pred,
        "lr": window.lr,
        "grad_norm": window.grad_norm if window.grad_norm is not None else float("nan"),
        "tokens": state.tokens,
        "pred_tokens": state.pred_tokens,
        "tokens_per_s": window.n_tokens / max(window.seconds, 1e-9),
        "elapsed_s": state.elapsed_s,
        "data_wait_frac": window.data_wait / max(window.seconds, 1e-9),
    }
    record["loss_bits"] = record["loss"] / math.log(2)
    record["eta_s"] = (cfg.total_updates - state.step) * window.seconds / max(window.steps, 1)
    writer.write(record)
    if accelerator.is_main_process:
        bar.write(console_line(record, cfg.total_updates))


def _write_eval(writer, state, split: str, result: dict) -> None:
    record = {
        "step": state.step,
        "split": split,
        **result,
        "loss_bits": result["loss"] / math.log(2),
        "tokens": state.tokens,
        "pred_tokens_seen": state.pred_tokens,
        "elapsed_s": state.elapsed_s,
    }
    writer.write(record)
    logger.info(
        "%s step %d | loss %.4f (%.4f bits) | acc %.3f",
        split,
        state.step,
        result["loss"],
        record["loss_bits"],
        result["acc"],
    )


def _validate(accelerator, cfg, model, data, state, writer, run_dir, bar) -> None:
    result = evaluate(accelerator, model, data.valid)
    state.last_eval_step = state.step
    if result is None:
        return
    _write_eval(writer, state, "valid", result)
    if result["loss"] < state.best_valid_loss:
        state.best_valid_loss = result["loss"]
        _save(accelerator, data, state, run_dir, "best")


def _save(accelerator, data, state, run_dir: Path, name: str) -> None:
    save_checkpoint(accelerator, run_dir, name, state.to_json(), data.train.state_dict())


if __name__ == "__main__":
    sys.exit(main())
