"""mpnet-dist: distributed MPNet pretraining on Accelerate and DeepSpeed."""

__version__ = "0.1.0"
