"""MPNet model: two-stream pretraining forward, HF-compatible encode, conversion to and from HF."""

from .config import MPNetConfig
from .hf import HFExportError, export_problems, from_hf, to_hf
from .mpnet import MPNetForPretraining

__all__ = ["HFExportError", "MPNetConfig", "MPNetForPretraining", "export_problems", "from_hf", "to_hf"]
