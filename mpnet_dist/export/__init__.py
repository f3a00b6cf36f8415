"""Export to Hugging Face: a verified MPNetForMaskedLM folder from any checkpoint, or at the end of training.

weights.py    consolidated fp32 weights from any checkpoint kind (single process, DDP, DeepSpeed ZeRO-1/2/3)
reference.py  the same from the reference trainer's (annotated-mpnet) .pt files
live.py       the end-of-training export: all ranks gather the live weights, rank 0 writes
tokenizer.py  the tokenizer saved with the model, checked against it
folder.py     the HF folder writer: temporary folder, self-check, then renamed into place
check.py      the self-check: reload with transformers, compare config, MLM logits and tokenizer
offline.py    export_checkpoint: checkpoint -> weights -> folder (CPU only)
cli.py        `mpnet-dist export` and `convert-to-hf`
"""

from mpnet_dist.export.cli import convert_to_hf_main, main
from mpnet_dist.export.errors import ExportError, ExportVerificationError
from mpnet_dist.export.folder import INFO_FILE, ExportReport, check_exportable, export_model
from mpnet_dist.export.live import export_from_training
from mpnet_dist.export.offline import export_checkpoint

__all__ = [
    "INFO_FILE",
    "ExportError",
    "ExportReport",
    "ExportVerificationError",
    "check_exportable",
    "convert_to_hf_main",
    "export_checkpoint",
    "export_from_training",
    "export_model",
    "main",
]
