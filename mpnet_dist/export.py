"""`mpnet-dist export`: a verified Hugging Face MPNetForMaskedLM folder from any checkpoint, or at the end of training.

checkpoint -> consolidated fp32 CPU weights (consolidate.py) -> HF model via model.to_hf (tied deliberately)
-> temporary folder (model.safetensors, config.json, tokenizer) -> reload with transformers and compare MLM
logits with our model -> renamed into place. A folder that fails the check is moved to OUT_DIR.failed with a
note saying why, so nothing half-right ever sits at OUT_DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mpnet_dist.checkpoint import CheckpointError, read_train_state
from mpnet_dist.consolidate import (
    gather_state_dict,
    load_checkpoint_model,
    load_complete_state_dict,
    load_reference_checkpoint,
    resolve_checkpoint,
)
from mpnet_dist.export_check import ExportVerificationError, verify_export
from mpnet_dist.model import HFExportError, MPNetConfig, MPNetForPretraining, export_problems, to_hf
from mpnet_dist.sentence_transformers_files import write_sentence_transformers_files

logger = logging.getLogger("mpnet_dist")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
INFO_FILE = "mpnet_dist_export.json"  # provenance; also marks a folder a later export may replace
FAILED_NOTE = "EXPORT_FAILED.txt"


class ExportError(RuntimeError):
    """The export cannot be done as asked; the message says what to change."""


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
    sentence_transformers: bool = True,
) -> ExportReport:
    """Write `model` (CPU, fp32) as a verified HF folder at out_dir. tokenizer: None only if not saving it.

    sentence_transformers: also the files that let `SentenceTransformer(out_dir)` load it (mean pooling);
    they need the tokenizer in the folder, so they are skipped without it.
    """
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
        if sentence_transformers and save_tokenizer:
            write_sentence_transformers_files(tmp, config.encoder_embed_dim, config.max_positions)
            what += " (+ sentence-transformers modules)"
        elif sentence_transformers:
            logger.info("no tokenizer saved: sentence-transformers files skipped (they need one)")
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


def special_token_ids(tokenizer: Any | None, config: MPNetConfig) -> tuple[int, int]:
    """(bos, eos) for config.json; the tokenizer must agree with the model on padding and size."""
    if tokenizer is None:
        logger.warning("no tokenizer: config.json gets MPNet's layout, bos_token_id=0 and eos_token_id=2")
        return 0, 2
    if tokenizer.pad_token_id != config.padding_idx:
        raise ExportError(
            f"the tokenizer's padding id is {tokenizer.pad_token_id} but the model was trained with padding_idx="
            f"{config.padding_idx}: pass the tokenizer the checkpoint was trained with (--tokenizer-name)"
        )
    if len(tokenizer) > config.vocab_size:
        raise ExportError(
            f"the tokenizer has {len(tokenizer)} tokens but the model only {config.vocab_size} embedding rows: "
            "pass the tokenizer the checkpoint was trained with (--tokenizer-name)"
        )
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    return (0 if bos is None else bos), (2 if eos is None else eos)


def load_run_tokenizer(train_state: dict[str, Any], name: str | None = None) -> Any:
    """The tokenizer a checkpoint was trained with (train_state's name unless `name` overrides it)."""
    from mpnet_dist.data import check_vocab, load_tokenizer

    name = name or train_state["tokenizer_name"]
    cache = (train_state.get("config") or {}).get("data_cache_dir")
    tokenizer = load_tokenizer(name) if cache is None else load_tokenizer(name, data_cache_dir=cache)
    if "tokenizer_size" in train_state:
        check_vocab(tokenizer, train_state["tokenizer_size"])
    return tokenizer


def export_checkpoint(
    checkpoint: Path,
    out_dir: Path,
    *,
    dtype: str = "float32",
    save_tokenizer: bool = True,
    trust: bool = False,
    tokenizer_name: str | None = None,
    sentence_transformers: bool = True,
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
    logger.info("exporting %s (step %s)", path, train_state.get("step"))
    config = MPNetConfig.from_dict(train_state["model_config"])
    check_exportable(config)  # refuse before reading the weights
    tokenizer = load_run_tokenizer(train_state, tokenizer_name) if save_tokenizer else None
    if tokenizer is not None:
        special_token_ids(tokenizer, config)  # tokenizer/model agreement, also before reading the weights
    if not checkpoint.is_file():
        model, _ = load_checkpoint_model(path, trust=trust)
    return export_model(
        model, out_dir, tokenizer, dtype=dtype, save_tokenizer=save_tokenizer, source=str(path),
        step=train_state.get("step"), sentence_transformers=sentence_transformers,
    )  # fmt: skip


def export_from_training(accelerator: Any, model: Any, cfg: Any, out_dir: Path) -> ExportReport | None:
    """Collective, every rank calls it: gather the live weights, rank 0 writes and verifies, the others wait.

    Returns the report on rank 0 and None elsewhere; raises on every rank when the export fails.
    """
    from accelerate.utils import broadcast_object_list

    config = accelerator.unwrap_model(model).config
    check_exportable(config)  # same config on every rank: all raise together, nobody waits forever
    state_dict = gather_state_dict(accelerator, model)
    outcome: list[Any] = [None]
    report = None
    if accelerator.is_main_process:
        try:
            with _without_hf_deepspeed():
                cpu_model = MPNetForPretraining(MPNetConfig.from_dict(config.to_dict()))
                load_complete_state_dict(cpu_model, state_dict, source="the training model")
                tokenizer = load_run_tokenizer(
                    {"tokenizer_name": cfg.tokenizer_name, "config": cfg.to_dict()}
                )
                report = export_model(cpu_model.eval(), out_dir, tokenizer, source="end of training")
        except Exception as err:  # re-raised below, after the other ranks have heard about it
            outcome[0] = f"{type(err).__name__}: {err}"
            failure = err
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome, from_process=0)
    accelerator.wait_for_everyone()
    if outcome[0] is not None:
        if accelerator.is_main_process:
            raise failure
        raise ExportError(f"export on rank 0 failed: {outcome[0]}")
    return report


@contextlib.contextmanager
def _without_hf_deepspeed() -> Iterator[None]:
    """Hide Accelerate's ZeRO-3 registration from transformers while rank 0 works alone.

    Otherwise building and reloading the HF model on rank 0 goes through DeepSpeed's zero.Init and
    parameter gathering, which are collectives the other ranks never join (a hang or a gloo size mismatch).
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpnet-dist export",
        description="Write a verified Hugging Face MPNetForMaskedLM folder (safetensors, config.json, tokenizer) "
        "from an mpnet-dist checkpoint of any kind (single process, DDP, DeepSpeed ZeRO-1/2/3). CPU only.",
    )
    parser.add_argument(
        "checkpoint",
        type=Path,
        help="checkpoint folder (step-N, best, final), run directory or annotated-mpnet .pt",
    )
    parser.add_argument(
        "out_dir", type=Path, help="output folder (new, empty, or an earlier export to replace)"
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="weight dtype (default float32)"
    )
    parser.add_argument("--no-save-tokenizer", action="store_true", help="write the model only")
    parser.add_argument(
        "--trust-checkpoint", action="store_true", help="allow pickled checkpoint files (only ones you trust)"
    )
    parser.add_argument(
        "--tokenizer-name", help="tokenizer to save (default: the one the run was trained with)"
    )
    parser.add_argument(
        "--no-sentence-transformers",
        action="store_true",
        help="skip modules.json, sentence_bert_config.json and 1_Pooling/ (written by default so that "
        "SentenceTransformer(OUT_DIR) loads the model with mean pooling)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return _run_cli(
        "mpnet-dist export",
        args.checkpoint,
        args.out_dir,
        dtype=args.dtype,
        save_tokenizer=not args.no_save_tokenizer,
        trust=args.trust_checkpoint,
        tokenizer_name=args.tokenizer_name,
        sentence_transformers=not args.no_sentence_transformers,
    )


def convert_to_hf_main(argv: list[str] | None = None) -> int:
    """`convert-to-hf`: the reference converter's flags, on mpnet-dist checkpoints."""
    parser = argparse.ArgumentParser(
        prog="convert-to-hf", description="Convert a checkpoint to an HF MPNet folder."
    )
    parser.add_argument(
        "--mpnet-checkpoint-path",
        type=Path,
        required=True,
        help="checkpoint folder, run directory, or an annotated-mpnet .pt file",
    )
    parser.add_argument("--hf-model-folder-path", type=Path, required=True, help="output folder")
    parser.add_argument("--no-save-tokenizer", action="store_true", help="write the model only")
    parser.add_argument("--trust-checkpoint", action="store_true", help="allow pickled checkpoint files")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return _run_cli(
        "convert-to-hf",
        args.mpnet_checkpoint_path,
        args.hf_model_folder_path,
        save_tokenizer=not args.no_save_tokenizer,
        trust=args.trust_checkpoint,
    )


def _run_cli(prog: str, checkpoint: Path, out_dir: Path, **kwargs: Any) -> int:
    if not logging.getLogger().handlers and not logger.handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    from mpnet_dist.data import DataError

    try:
        report = export_checkpoint(checkpoint, out_dir, **kwargs)
    # ValueError: HFExportError and MPNetConfig's own checks, both naming the setting at fault.
    except (ValueError, CheckpointError, ExportError, ExportVerificationError, DataError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    print(f"{prog}: wrote {report.out_dir} (max |logit diff| {report.max_abs_diff:.3g}, verified)")
    return 0
