"""`mpnet-dist export` without a training run: a checkpoint folder, a run directory or an annotated-mpnet
`.pt` file -> a verified HF folder, on CPU."""

from __future__ import annotations

import logging
from pathlib import Path

from mpnet_dist.checkpoint import read_train_state, resolve_checkpoint
from mpnet_dist.export.folder import ExportReport, check_exportable, export_model
from mpnet_dist.export.reference import load_reference_checkpoint
from mpnet_dist.export.tokenizer import load_run_tokenizer, special_token_ids
from mpnet_dist.export.weights import load_checkpoint_model
from mpnet_dist.model import MPNetConfig

logger = logging.getLogger("mpnet_dist")


def export_checkpoint(
    checkpoint: Path,
    out_dir: Path,
    *,
    dtype: str = "float32",
    save_tokenizer: bool = True,
    trust: bool = False,
    tokenizer_name: str | None = None,
) -> ExportReport:
    """Offline export (CPU only) of a checkpoint folder, a run directory (its final or newest checkpoint),
    or a `.pt` file written by the reference trainer, annotated-mpnet."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_file():
        model, train_state = load_reference_checkpoint(checkpoint, trust=trust)
        path = checkpoint
    else:
        path = resolve_checkpoint(checkpoint)
        train_state = read_train_state(path)
    logger.info("exporting %s (step %s)", path, train_state.step)
    config = MPNetConfig.from_dict(train_state.model_config)
    check_exportable(config)  # refuse before reading the weights
    tokenizer = load_run_tokenizer(train_state, tokenizer_name) if save_tokenizer else None
    if tokenizer is not None:
        special_token_ids(tokenizer, config)  # tokenizer/model agreement, also before reading the weights
    if not checkpoint.is_file():
        model, _ = load_checkpoint_model(path, trust=trust)
    return export_model(
        model, out_dir, tokenizer, dtype=dtype, save_tokenizer=save_tokenizer, source=str(path),
        step=train_state.step,
    )  # fmt: skip
