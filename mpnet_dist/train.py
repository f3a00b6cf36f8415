"""Training entry point: `accelerate launch -m mpnet_dist.train ARGS` (or `python -m mpnet_dist.train ARGS`).

Builds everything in order (accelerator, tokenizer, model, optimizer, data), restores a checkpoint if asked,
then runs optimizer steps until --total-updates, evaluating, checkpointing and logging on the way.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from mpnet_dist import __version__
from mpnet_dist.checkpoint import (
    CheckpointError,
    TrainState,
    load_checkpoint,
    prune_checkpoints,
    read_train_state,
    save_checkpoint,
    step_name,
)
from mpnet_dist.command import run_command
from mpnet_dist.compilation import check_compile_supported, compile_model, log_compile_time
from mpnet_dist.config import TrainConfig, parse_config
from mpnet_dist.data.pipeline import Data
from mpnet_dist.data.prefetch import Prefetcher
from mpnet_dist.data.unigram import unigram_loss
from mpnet_dist.distributed import build_accelerator, describe, zero_stage
from mpnet_dist.errors import UserError
from mpnet_dist.host_memory import keep_freed_memory
from mpnet_dist.metrics import LogWindow, MetricsWriter, console_line, setup_logging
from mpnet_dist.model_setup import build_model
from mpnet_dist.nodes import join, report_failure
from mpnet_dist.optim import build_optimizer, lr_at
from mpnet_dist.plot import refresh_curves
from mpnet_dist.run_folder import claim_run_folder, decide_on_rank_zero, prepare_run_folder
from mpnet_dist.step import NonFiniteLossError, StepResult, StepSettings, evaluate, train_step
from mpnet_dist.stopping import PREEMPTED_MARKER, StopSignal, stop_with_launcher

logger = logging.getLogger("mpnet_dist")


def main(argv: list[str] | None = None) -> int:
    """A user error ends as one line on stderr and exit code 2 (command.py); --debug shows its traceback."""
    argv = sys.argv[1:] if argv is None else argv
    return run_command("mpnet-dist train", _train, argv)


def _train(args: list[str]) -> int:
    cfg = parse_config(args)
    try:
        return run(cfg)
    except UserError:
        raise
    except Exception as err:
        code = report_failure(err)  # a host with no route, a lost node: one line naming it, no traceback
        if code is None:
            raise
        return code


def run(cfg: TrainConfig) -> int:
    stop_with_launcher()
    # Several nodes only: interface, node table and heartbeat, before the process group exists.
    cluster = join(cfg.startup_timeout_s, cfg.node_timeout_s, torch.cuda.is_available())
    loop = build_loop(cfg)
    try:
        code = _train_loop(loop)
    finally:
        loop.writer.close()
    if cluster is not None:
        cluster.leave()  # finished cleanly: the others must not count this node's silence as a loss
    return code


@dataclass(eq=False)
class Loop:
    """Everything the training loop carries from step to step, in one object (as torchtitan's Trainer and
    litgpt's `state`): what was built at the start, the progress saved in train_state.json, the log window."""

    cfg: TrainConfig
    accelerator: Any
    model: Any
    optimizer: Any
    data: Data
    tokenizer: Any
    resume_from: Path | None
    run_info: dict[str, Any]  # the fields of train_state.json that are fixed for the whole run
    writer: MetricsWriter | None = None
    # progress: saved in every checkpoint, restored on resume
    step: int = 0
    tokens: int = 0  # non-padding input tokens, all ranks
    pred_tokens: int = 0  # predicted tokens, all ranks
    best_valid_loss: float = math.inf
    elapsed_s: float = 0.0
    # within this process only
    last_eval_step: int = -1
    nonfinite_run: int = 0  # consecutive skipped (NaN/Inf) steps
    compiled: bool = False  # --compile: the first step (which compiles) has run and its time was logged
    window: LogWindow = field(default_factory=LogWindow)
    stop: StopSignal | None = None
    bar: Any = None

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.checkpoint_dir)

    def train_state(self) -> TrainState:
        progress = (self.step, self.tokens, self.pred_tokens, self.best_valid_loss, self.elapsed_s)
        return TrainState(**dict(zip(_PROGRESS, progress, strict=True)), **self.run_info)

    def restore(self, saved: TrainState) -> None:
        for name in _PROGRESS:
            setattr(self, name, getattr(saved, name))
        self.last_eval_step = saved.step


_PROGRESS = ("step", "tokens", "pred_tokens", "best_valid_loss", "elapsed_s")


def build_loop(cfg: TrainConfig) -> Loop:
    """Accelerator, tokenizer, model, optimizer, data and metrics, in that order; a checkpoint restored if asked."""
    accelerator = build_accelerator(cfg)
    setup_logging(accelerator.is_main_process, cfg.debug)
    logger.info("mpnet-dist %s: %s", __version__, describe(accelerator))
    if accelerator.device.type == "cpu":
        keep_freed_memory()
    # Before anything slow: refuse a folder holding another run, a damaged checkpoint (rank 0 decides).
    resume_from = decide_on_rank_zero(accelerator, lambda: claim_run_folder(cfg))
    if cfg.resume and resume_from is None:
        logger.info("--resume: no complete checkpoint in %s, starting from scratch", cfg.checkpoint_dir)
    set_seed(cfg.seed)  # the same initial weights on every rank

    from mpnet_dist.data import build_data, check_vocab, load_tokenizer

    tokenizer = load_tokenizer(cfg.tokenizer_name, cfg.data_cache_dir)
    saved = read_train_state(resume_from) if resume_from else None
    if saved is not None and saved.tokenizer_size is not None:
        check_vocab(tokenizer, saved.tokenizer_size)
    model = build_model(cfg, tokenizer, saved)
    # Same weights everywhere, but each rank its own dropout masks (seed + rank); a resumed run restores
    # every rank's RNG from the checkpoint instead.
    set_seed(cfg.seed, device_specific=True)
    if cfg.export_hf_dir:
        from mpnet_dist.export import check_exportable

        check_exportable(model.config)  # refuse now, not after days of training
    optimizer = build_optimizer(model, cfg)
    data = build_data(cfg, tokenizer, accelerator.process_index, accelerator.num_processes)
    logger.info("data: %s", data.source_info)
    if cfg.compile:
        check_compile_supported(zero_stage(accelerator))
        compile_model(model, accelerator.device, cfg.compile_backend)
    model, optimizer = accelerator.prepare(model, optimizer)
    run_info = {
        "model_config": accelerator.unwrap_model(model).config.to_dict(),
        "tokenizer_name": cfg.tokenizer_name,
        "tokenizer_size": len(tokenizer),
        "zero_stage": zero_stage(accelerator),
        "distributed_type": str(accelerator.distributed_type),
        "mpnet_dist_version": __version__,
        "config": cfg.to_dict(),
    }
    loop = Loop(cfg, accelerator, model, optimizer, data, tokenizer, resume_from, run_info)
    if resume_from:
        _restore(loop)
    prepare_run_folder(accelerator, cfg, loop.step)
    curves = refresh_curves if cfg.plot_curves else None  # RUN_DIR/curves.png after each validation
    loop.writer = MetricsWriter(cfg, loop.run_dir, accelerator.is_main_process, curves)
    if cfg.wandb_watch and loop.writer.wandb is not None:
        loop.writer.wandb.watch(accelerator.unwrap_model(model), log_freq=100)
    return loop


def _restore(loop: Loop) -> None:
    """Load the checkpoint into the prepared model/optimizer and the data loader, and the loop's progress."""
    saved, data_state = load_checkpoint(
        loop.accelerator, loop.resume_from, trust=loop.cfg.trust_checkpoint, checked=True
    )
    if data_state is None:  # never restart the data silently from the first block
        raise CheckpointError(
            f"{loop.resume_from} holds no data state (data_state_rank*.pt): the checkpoint is incomplete; resume "
            "from another checkpoint of the run"
        )
    loop.data.train.load_state_dict(data_state)
    loop.restore(saved)
    logger.info("resumed from %s at step %d", loop.resume_from, saved.step)


def _train_loop(loop: Loop) -> int:
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    loop.stop = StopSignal(loop.run_dir)
    loop.bar = tqdm(
        total=loop.cfg.total_updates,
        initial=loop.step,
        disable=None
        if loop.accelerator.is_main_process
        else True,  # None: no bar unless stderr is a terminal
        desc="train",
        dynamic_ncols=True,
        leave=False,
    )
    if loop.cfg.prefetch_steps:  # after the restore: it starts from the source's restored position
        loop.data.train = Prefetcher(
            loop.data.train, loop.cfg.prefetch_steps * loop.cfg.update_freq, loop.accelerator.device
        )
    try:
        with logging_redirect_tqdm([logger]):  # log lines go above the bar instead of onto its line
            return _run_steps(loop)
    finally:
        loop.bar.close()
        loop.stop.close()
        if isinstance(loop.data.train, Prefetcher):
            loop.data.train.close()


def _run_steps(loop: Loop) -> int:
    """The outline of training: a baseline evaluation, then steps until --total-updates or a stop request."""
    cfg = loop.cfg
    if loop.step == 0 and cfg.total_updates > 0:
        # The untrained model and the unigram baseline: every later evaluation is read against both.
        baseline = unigram_loss(loop.accelerator, loop.data)  # collective
        _evaluate(loop, "valid", {} if baseline is None else {"unigram_loss": baseline})
    loop.model.train()
    while loop.step < cfg.total_updates:
        result = _step(loop)
        _apply_nonfinite_policy(loop, result)
        if loop.step % cfg.logging_steps == 0 or loop.step == cfg.total_updates:
            _log_train(loop)
        if loop.step % cfg.resolved_eval_interval() == 0 and loop.step < cfg.total_updates:
            _validate(loop)
        if _checkpoint_due(loop):
            _save(loop, step_name(loop.step))
            if loop.accelerator.is_main_process:
                prune_checkpoints(loop.run_dir, cfg.keep_checkpoints, protect=loop.resume_from)
        if result.stop_requested and loop.step < cfg.total_updates:
            return _stop_early(loop)
    return _finish(loop)


def _step(loop: Loop) -> StepResult:
    """One optimizer step: this step's micro-batches, its learning rate, train_step, the counters."""
    cfg = loop.cfg
    started = time.perf_counter()
    micro_batches = [next(loop.data.train) for _ in range(cfg.update_freq)]
    loop.window.data_wait += time.perf_counter() - started
    lr = lr_at(
        loop.step + 1, cfg.lr, cfg.resolved_warmup(), cfg.total_updates, cfg.end_learning_rate, cfg.power
    )
    logs = (loop.step + 1) % cfg.logging_steps == 0 or loop.step + 1 == cfg.total_updates
    settings = StepSettings(lr, cfg.clip_grad_norm, stop_vote=loop.stop.poll(), read_grad_norm=logs)
    result = train_step(loop.accelerator, loop.model, loop.optimizer, micro_batches, settings)
    seconds = time.perf_counter() - started
    if cfg.compile and not loop.compiled:  # this process compiled during this step
        log_compile_time(seconds)
        loop.compiled = True
    loop.step += 1
    loop.tokens += result.n_tokens_global
    loop.pred_tokens += result.n_pred_global
    loop.elapsed_s += seconds
    loop.window.add(result, lr, seconds)
    loop.bar.update(1)
    return result


def _apply_nonfinite_policy(loop: Loop, result: StepResult) -> None:
    """A NaN/Inf step was skipped by train_step; stop after more than --max-nonfinite-skips in a row."""
    if not result.skipped:
        loop.nonfinite_run = 0
        return
    loop.nonfinite_run += 1
    logger.warning("step %d: non-finite loss, update skipped (%d in a row)", loop.step, loop.nonfinite_run)
    if loop.nonfinite_run > loop.cfg.max_nonfinite_skips:
        raise NonFiniteLossError(
            f"loss was NaN/Inf for {loop.nonfinite_run} step(s) in a row (limit --max-nonfinite-skips "
            f"{loop.cfg.max_nonfinite_skips}); stopped without saving. The last good checkpoint in {loop.run_dir} "
            "is intact: resume from it with a lower --lr or stronger --clip-grad-norm."
        )


def _checkpoint_due(loop: Loop) -> bool:
    interval = loop.cfg.checkpoint_interval
    return interval > 0 and loop.step % interval == 0


def _stop_early(loop: Loop) -> int:
    """A stop was requested (preemption, PREEMPT file, Ctrl-C): save unless just saved, mark, exit 0."""
    if not _checkpoint_due(loop):
        _save(loop, step_name(loop.step))
    if loop.accelerator.is_main_process:
        (loop.run_dir / PREEMPTED_MARKER).write_text(f"{loop.step}\n")
    logger.info("stopped at step %d after saving %s; continue with --resume", loop.step, step_name(loop.step))
    return 0


def _finish(loop: Loop) -> int:
    """After the last step: validation (unless just done), test, the final checkpoint, the export if asked."""
    loop.bar.close()
    if loop.last_eval_step != loop.step:
        _validate(loop)
    _evaluate(loop, "test")
    _save(loop, "final")
    if loop.cfg.export_hf_dir:
        from mpnet_dist.export import export_from_training

        export_from_training(loop.accelerator, loop.model, loop.tokenizer, Path(loop.cfg.export_hf_dir))
    logger.info("done: %d steps, %s tokens in %.0fs", loop.step, f"{loop.tokens:,}", loop.elapsed_s)
    if loop.cfg.fill_mask_demo and loop.accelerator.is_main_process:
        from mpnet_dist.fill_mask import print_demo

        print_demo(loop.cfg, loop.run_dir / "final")
    return 0


def _log_train(loop: Loop) -> None:
    window, cfg = loop.window, loop.cfg
    sums = torch.stack([window.loss.double(), window.correct.double()])
    loss, correct = loop.accelerator.reduce(sums, reduction="sum").tolist()  # host sync: log steps only
    n_pred = max(window.n_pred, 1)
    record = {
        "step": loop.step,
        "split": "train",
        "loss": loss / n_pred,
        "acc": correct / n_pred,
        "lr": window.lr,
        "grad_norm": window.grad_norm if window.grad_norm is not None else float("nan"),
        "tokens": loop.tokens,
        "pred_tokens": loop.pred_tokens,
        "tokens_per_s": window.n_tokens / max(window.seconds, 1e-9),
        "elapsed_s": loop.elapsed_s,
        "data_wait_frac": window.data_wait / max(window.seconds, 1e-9),
    }
    record["loss_bits"] = record["loss"] / math.log(2)
    record["eta_s"] = (cfg.total_updates - loop.step) * window.seconds / max(window.steps, 1)
    loop.writer.write(record)
    if loop.accelerator.is_main_process:
        loop.bar.write(console_line(record, cfg.total_updates))
    loop.window = LogWindow()


def _evaluate(loop: Loop, split: str, extra: dict[str, float] | None = None) -> dict[str, float] | None:
    """Evaluate on `split` ("valid" or "test") and record it with `extra`; None when there is no such data."""
    result = evaluate(loop.accelerator, loop.model, getattr(loop.data, split))
    if result is None:
        return None
    record = {
        "step": loop.step,
        "split": split,
        "loss": result["loss"],
        "acc": result["acc"],
        **(extra or {}),
        "loss_bits": result["loss"] / math.log(2),
        "eval_pred_tokens": result["pred_tokens"],  # predicted tokens in this evaluation
        "tokens": loop.tokens,  # as in train rows: trained on so far
        "pred_tokens": loop.pred_tokens,
        "elapsed_s": loop.elapsed_s,
    }
    loop.writer.write(record)
    baseline = f" | unigram baseline {record['unigram_loss']:.4f}" if "unigram_loss" in record else ""
    logger.info(
        "%s step %d | loss %.4f (%.4f bits) | acc %.3f%s",
        split,
        loop.step,
        result["loss"],
        record["loss_bits"],
        result["acc"],
        baseline,
    )
    return result


def _validate(loop: Loop) -> None:
    """Validation during training: a new lowest loss is saved as best/."""
    result = _evaluate(loop, "valid")
    loop.last_eval_step = loop.step
    if result is not None and result["loss"] < loop.best_valid_loss:
        loop.best_valid_loss = result["loss"]
        _save(loop, "best")


def _save(loop: Loop, name: str) -> None:
    save_checkpoint(loop.accelerator, loop.run_dir, name, loop.train_state(), loop.data.train.state_dict())


if __name__ == "__main__":
    sys.exit(main())
