"""Dropout whose CPU mask is drawn four elements per 64-bit random word.

PyTorch's CPU `bernoulli_` draws one float per element from its Mersenne Twister, about 11 ns an element on
the CPUs measured (BENCHMARKS.md section 5): the hidden and attention dropout masks cost more than the
softmax, LayerNorms and GELU of a small model's step together. Here one 64-bit draw from the same generator
gives four 16-bit codes and an element is kept when its code falls below the keep threshold, about 3x faster.

- The generator is torch's default CPU generator, so seeding and the RNG state that checkpoints save and
  restore cover it exactly as before; the masks differ from `bernoulli_`'s for the same seed (the draws are
  consumed differently), not in distribution.
- The keep probability is rounded to a multiple of 2^-16 (0.9 -> 0.899994) and kept elements are scaled by
  the inverse of that rounded probability, so every element's expected output is its input exactly.
- CUDA keeps `F.dropout` (a fused Philox kernel there), and so does a compiled graph (Inductor generates its
  own random numbers, or calls ATen's with `fallback_random`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CODES = 1 << 16  # distinct 16-bit codes per element


def draws_own_masks(x: Tensor) -> bool:
    """Whether dropout of `x` uses `keep_mask` (a CPU tensor in eager mode) rather than PyTorch's own."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """F.dropout(x, p, training), with the mask drawn as `keep_mask` does on a CPU in eager mode."""
    if not training or p == 0.0:
        return x
    kept_codes = round((1.0 - p) * CODES)
    if not draws_own_masks(x) or not 0 < kept_codes < CODES:
        return F.dropout(x, p, training=True)
    return x * keep_mask(x.shape, kept_codes, x.dtype)


def keep_mask(shape: torch.Size, kept_codes: int, dtype: torch.dtype) -> Tensor:
    """[shape] of CODES / kept_codes where kept (probability kept_codes / CODES each) and 0 elsewhere."""
    count = math.prod(shape)
    # -2**63 with no upper bound asks for the full 64-bit range: every 16-bit slice is uniform.
    words = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    codes = words.view(torch.int16)[:count].view(shape)
    # clamp(threshold - code, 0, 1) is 1 below the threshold and 0 from it on, exactly (integers in fp32): one
    # conversion and in-place passes, 3x faster than comparing int16 codes and casting the bools.
    mask = codes.to(torch.float32).neg_().add_(kept_codes - CODES // 2).clamp_(0, 1).mul_(CODES / kept_codes)
    return mask.to(dtype)


class Dropout(nn.Dropout):
    """nn.Dropout drawing its CPU masks with `keep_mask` (same state dict: none)."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)
