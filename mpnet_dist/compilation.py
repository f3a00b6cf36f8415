"""`--compile`: torch.compile of the whole model, in place, and the compile time logged once.

What is compiled was decided from measurements (BENCHMARKS.md, "Compilation"): the whole model (one graph,
forward and backward: embeddings, bias gather, every layer, the LM head), not each layer alone and not the
loss. The model is compiled in place (nn.Module.compile), so its state dict, checkpoints and exports carry
no `_orig_mod.` prefix, and Accelerate wraps it (DDP, DeepSpeed) as usual. Evaluation runs it eagerly
(mpnet_dist.step.evaluate).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger("mpnet_dist")


def check_compile_supported(zero_stage: int) -> None:
    """Refuse --compile where it cannot give one graph."""
    if zero_stage == 3:
        # Measured: 35 graphs and 51 graph breaks for the tiny test model, minutes of compiling, no gain.
        raise ValueError(
            "--compile does not work with DeepSpeed ZeRO-3: its parameter-gathering hooks break the model into "
            "dozens of graphs. Use launch_configs/accelerate/deepspeed_zero2.yaml (or DDP) with --compile, or "
            "drop --compile for ZeRO-3."
        )


def compile_model(model: nn.Module, device: torch.device, backend: str = "inductor") -> None:
    """torch.compile `model` in place; graphs are built on the first forward and backward."""
    if torch.device(device).type == "cpu":
        import torch._inductor.config as inductor_config

        # Inductor's own CPU random numbers (the dropout masks) cost ~10x ATen's bernoulli_ per element
        # (measured: attention-dropout kernels 150 ms against 15 ms per step); use ATen's generator there.
        # On CUDA Inductor's Philox masks are the fast ones: left alone.
        inductor_config.fallback_random = True
    model.compile(backend=backend)


def log_compile_time(first_step_s: float) -> None:
    """After the first step of a compiled model: compile time, graphs and graph breaks, once per process."""
    try:  # private API, stable across torch 2.x so far; without it only the first step's time is reported
        from torch._dynamo.utils import calculate_time_spent, counters

        compiling = calculate_time_spent().get("total_wall_time", 0.0)
        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    except ImportError:
        compiling, graphs, breaks = 0.0, 0, 0
    logger.log(
        logging.WARNING if breaks else logging.INFO,
        "torch.compile: %.1f s compiling, %d graph(s), %d graph breaks; the first step took %.1f s",
        compiling,
        graphs,
        breaks,
        first_step_s,
    )
