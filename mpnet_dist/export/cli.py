"""The export's two console programs: `mpnet-dist export` and the reference's `convert-to-hf`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from mpnet_dist.checkpoint import CheckpointError
from mpnet_dist.export.errors import ExportError
from mpnet_dist.export.folder import DTYPES
from mpnet_dist.export.offline import export_checkpoint

logger = logging.getLogger("mpnet_dist")


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
    except (ValueError, CheckpointError, ExportError, DataError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    print(f"{prog}: wrote {report.out_dir} (max |logit diff| {report.max_abs_diff:.3g}, verified)")
    return 0
