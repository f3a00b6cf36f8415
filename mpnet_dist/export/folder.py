"""The Hugging Face folder: write a model as a verified MPNetForMaskedLM folder, or nothing at all.

model (CPU, fp32) -> HF model via model.to_hf (tied deliberately) -> temporary folder (model.safetensors,
config.json, tokenizer) -> reload with transformers and compare MLM logits with our model (check.py) ->
renamed into place. A folder that fails the check is moved to OUT_DIR.failed with a note saying why, so
nothing half-right ever sits at OUT_DIR.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mpnet_dist.export.check import verify_export
from mpnet_dist.export.errors import ExportError, ExportVerificationError
from mpnet_dist.export.tokenizer import special_token_ids
from mpnet_dist.export.weights import load_complete_state_dict
from mpnet_dist.model import HFExportError, MPNetConfig, MPNetForPretraining, export_problems, to_hf

logger = logging.getLogger("mpnet_dist")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
INFO_FILE = "mpnet_dist_export.json"  # provenance; also marks a folder a later export may replace
FAILED_NOTE = "EXPORT_FAILED.txt"


@dataclass
class ExportReport:
    out_dir: str
    dtype: str
    max_abs_diff: float
    tolerance: float
    bf16_native_max_abs_diff: float | None
    source: str
    step: int | None


def check_exportable(config: MPNetConfig) -> None:
    """Raise HFExportError naming every setting HF MPNet cannot represent (before anything is read or written)."""
    problems = export_problems(config)
    if problems:
        raise HFExportError(
            "this model cannot be exported to Hugging Face MPNetForMaskedLM: "
            + "; ".join(problems)
            + ". Train with the defaults for these settings to get an exportable model."
        )


def export_model(
    model: MPNetForPretraining,
    out_dir: Path,
    tokenizer: Any | None,
    *,
    dtype: str = "float32",
    save_tokenizer: bool = True,
    source: str = "",
    step: int | None = None,
) -> ExportReport:
    """Write `model` (CPU, fp32) as a verified HF folder at out_dir. tokenizer: None only if not saving it."""
    config = model.config
    check_exportable(config)
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    out_dir = Path(out_dir)
    _check_target(out_dir)
    bos, eos = special_token_ids(tokenizer, config)
    # The weights exactly as they will be stored; the check compares against a model carrying these.
    exported = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()}
    hf_model = to_hf(model, exported, bos_token_id=bos, eos_token_id=eos)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        hf_model.save_pretrained(tmp)
        if save_tokenizer:
            tokenizer.model_max_length = config.max_positions  # as the reference converter does
            tokenizer.save_pretrained(tmp)
        what = "weights, config and tokenizer" if save_tokenizer else "weights and config"
        logger.info("wrote %s %s to %s; verifying", dtype, what, tmp)
        reference = MPNetForPretraining(MPNetConfig.from_dict(config.to_dict()))
        load_complete_state_dict(reference, {k: v.float() for k, v in exported.items()}, source="export")
        check = verify_export(tmp, reference.eval(), model, tokenizer if save_tokenizer else None, dtype)
    except ExportVerificationError as err:
        raise _reject(tmp, out_dir, err) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a crash mid-write leaves nothing behind
        raise
    report = ExportReport(str(out_dir), dtype, *check, source=source, step=step)
    (tmp / INFO_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n")
    _move_into_place(tmp, out_dir)
    logger.info("exported %s (verified: max |logit diff| %.3g <= %.3g)", out_dir, check[0], check[1])
    return report


def _reject(tmp: Path, out_dir: Path, err: ExportVerificationError) -> ExportVerificationError:
    """Keep a folder that failed its check as OUT_DIR.failed, with the reason, never at OUT_DIR."""
    failed = out_dir.with_name(out_dir.name + ".failed")
    shutil.rmtree(failed, ignore_errors=True)
    tmp.rename(failed)
    (failed / FAILED_NOTE).write_text(f"{err}\n")
    return ExportVerificationError(f"{err}\nThe rejected folder was kept for inspection at {failed}")


def _check_target(out_dir: Path) -> None:
    if out_dir.is_file():
        raise ExportError(f"{out_dir} is a file; OUT_DIR must be a folder (new, empty, or an earlier export)")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / INFO_FILE).is_file():
        raise ExportError(
            f"{out_dir} exists and holds files that are not an mpnet-dist export; choose a new folder or empty it"
        )


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    old = out_dir.with_name(f".{out_dir.name}.old-export")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(out_dir.with_name(out_dir.name + ".failed"), ignore_errors=True)
