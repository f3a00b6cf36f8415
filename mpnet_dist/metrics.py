"""Logging: the console line, metrics.jsonl, TensorBoard and W&B. Everything here runs on the main process only."""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger("mpnet_dist")


class _TiedWeightNotice(logging.Filter):
    """Accelerate warns on every save that it dropped the LM head's copy of the tied embedding; that is intended."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


def setup_logging(is_main: bool, debug: bool = False) -> None:
    logging.getLogger("accelerate.utils.other").addFilter(_TiedWeightNotice())
    level = logging.DEBUG if debug else logging.INFO
    if not is_main:
        level = logging.WARNING  # other ranks speak only when something is wrong
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[mpnet] %(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def console_line(m: dict[str, Any], total_steps: int) -> str:
    return (
        f"step {m['step']}/{total_steps} | loss {m['loss']:.4f} | acc {m['acc']:.3f} | lr {m['lr']:.2e} | "
        f"gnorm {m['grad_norm']:.2f} | {m['tokens_per_s']:,.0f} tok/s | data wait {m['data_wait_frac']:.1%} | "
        f"eta {format_eta(m['eta_s'])}"
    )


class LogWindow:
    """Sums over the steps since the last log line (loss sums stay on device until then)."""

    def __init__(self):
        self.loss = self.correct = None
        self.n_pred = self.n_tokens = self.steps = 0
        self.seconds = self.data_wait = 0.0
        self.lr, self.grad_norm = 0.0, None

    def add(self, result: Any, lr: float, seconds: float) -> None:
        self.loss = result.loss_sum if self.loss is None else self.loss + result.loss_sum
        self.correct = result.correct if self.correct is None else self.correct + result.correct
        self.n_pred += result.n_pred_global
        self.n_tokens += result.n_tokens_global
        self.steps += 1
        self.seconds += seconds
        self.lr = lr
        if result.grad_norm is not None:
            self.grad_norm = result.grad_norm


class MetricsWriter:
    """Appends one JSON object per logged step or evaluation to metrics.jsonl, mirrors to trackers."""

    def __init__(self, cfg, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        if cfg.tensorboard_log_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(cfg.tensorboard_log_dir)
        if cfg.wandb:
            self.wandb = _init_wandb(cfg)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        split, step = record["split"], record["step"]
        scalars = {
            k: v for k, v in record.items() if k not in ("split", "step") and isinstance(v, (int, float))
        }
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(f"{split}/{key}", value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({f"{split}/{k}": v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _init_wandb(cfg):
    try:
        import wandb
    except ImportError:
        raise RuntimeError("--wandb needs the wandb package: pip install 'mpnet-dist[wandb]'") from None
    kwargs = {
        "project": cfg.wandb_project,
        "name": cfg.wandb_name,
        "config": cfg.to_dict(),
        "dir": os.environ.get("WANDB_DIR", cfg.checkpoint_dir),  # run folder unless WANDB_DIR says otherwise
    }
    if cfg.wandb_id:
        kwargs.update(id=cfg.wandb_id, resume="allow")
    run = wandb.init(**kwargs)
    return run


def read_metrics(run_dir: Path | str) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
