"""FLOP accounting, peak FLOP/s and machine description shared by the training benchmarks.

FLOPs are matmul FLOPs only (2 per multiply-add); softmax, LayerNorm, GELU, embedding gathers, the
bias gather and the optimizer are not counted. Backward costs twice the forward, so a training step
is 3x the forward. Per row (one sequence), H hidden, F ffn, n layers, V vocab:

  ours (two-stream): T = L + 2p query rows, S = L + p key/value rows, LM head on the p query rows
    layer = 2*T*H*H (Q) + 4*S*H*H (K, V on the content rows only) + 2*T*S*H (QK^T) + 2*T*S*H (PV)
            + 2*T*H*H (out proj) + 4*T*H*F (FFN)
    head  = 2*p*H*H (dense) + 2*p*H*V (tied projection)
    the last layer computes only the p query rows (T = p there; K, V still on S rows): its content rows
    feed nothing. Revisions before that change computed every row of every layer (full_last_layer=True).
  HF MPNetForMaskedLM: the same with T = S = L in every layer and the head on all L rows.

  step FLOPs = 3 * B * ((n - 1) * layer + last layer + head);  MFU = step FLOPs / step time / peak FLOP/s.
"""

from __future__ import annotations

import os
import platform
import time

import torch

from benchmarks.machine import cpu_model

# Dense bf16 tensor-core peaks from the vendors' spec sheets (no sparsity), for MFU on GPUs.
GPU_BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def layer_flops(rows: int, kv_rows: int, hidden: int, ffn: int) -> int:
    projections = 2 * rows * hidden * hidden * 2 + 4 * kv_rows * hidden * hidden
    attention = 4 * rows * kv_rows * hidden
    return projections + attention + 4 * rows * hidden * ffn


def head_flops(rows: int, hidden: int, vocab: int) -> int:
    return 2 * rows * hidden * hidden + 2 * rows * hidden * vocab


def two_stream_step_flops(
    batch: int,
    length: int,
    pred: int,
    layers: int,
    hidden: int,
    ffn: int,
    vocab: int,
    full_last_layer: bool = False,
) -> int:
    rows, kv_rows = length + 2 * pred, length + pred
    last = layer_flops(rows if full_last_layer else pred, kv_rows, hidden, ffn)
    forward = (layers - 1) * layer_flops(rows, kv_rows, hidden, ffn) + last + head_flops(pred, hidden, vocab)
    return 3 * batch * forward


def mlm_step_flops(batch: int, length: int, layers: int, hidden: int, ffn: int, vocab: int) -> int:
    forward = layers * layer_flops(length, length, hidden, ffn) + head_flops(length, hidden, vocab)
    return 3 * batch * forward


def gemm_flops_per_s(
    device: torch.device, dtype: torch.dtype, size: int = 2048, calls: int = 3
) -> tuple[float, float]:
    """Best observed square-GEMM rate, per wall second and per process CPU second: the achievable
    matmul peak of this machine right now."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.mm(a, b)  # warm-up (oneDNN/cuBLAS heuristics, page faults)
    best_wall = best_cpu = float("inf")
    for _ in range(calls):
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        sync(device)
        best_wall = min(best_wall, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - cpu_start)
    return 2 * size**3 / best_wall, 2 * size**3 / max(best_cpu, 1e-9)


def spec_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in GPU_BF16_PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_line(device: torch.device) -> str:
    import transformers

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    isa = torch.backends.cpu.get_cpu_capability()
    return (
        f"{where}; {os.cpu_count()} CPUs ({isa}), torch {torch.__version__} with {torch.get_num_threads()} "
        f"threads, transformers {transformers.__version__}, python {platform.python_version()}"
    )


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} CPUs)"
