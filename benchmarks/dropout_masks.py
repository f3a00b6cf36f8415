"""CPU dropout: torch's `F.dropout` (bernoulli_ masks) against mpnet_dist.model.dropout, and attention with
dropout through torch's SDPA (its math path on CPU) against the trainer's `math_attention`.

    OMP_NUM_THREADS=1 python -m benchmarks.dropout_masks --threads 1

Shapes default to the speed issue's step (4 x 256, 4 heads, L=128, B=16: 166 two-stream rows, 147 keys).
Forward + backward, median ms over interleaved repetitions; the last column is the per-step total of each
(the step has 7 hidden dropouts and 3 full attention layers plus one of 19 query rows).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks import step_flops
from mpnet_dist.model.attention import math_attention
from mpnet_dist.model.dropout import dropout


def timed(fn, repeats: int) -> list[float]:
    fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rows", type=int, default=166)
    p.add_argument("--keys", type=int, default=147)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--p", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {step_flops.machine_line(torch.device('cpu'))}")
    print(f"start: {step_flops.load_line()}")
    torch.manual_seed(0)
    hidden = torch.randn(args.batch, args.rows, args.hidden, requires_grad=True)
    head_dim = args.hidden // args.heads
    q = torch.randn(args.batch, args.rows, args.heads, head_dim).transpose(1, 2).requires_grad_()
    k = torch.randn(args.batch, args.keys, args.heads, head_dim).transpose(1, 2).requires_grad_()
    v = torch.randn(args.batch, args.keys, args.heads, head_dim).transpose(1, 2).requires_grad_()
    bias = torch.randn(args.batch, args.heads, args.rows, args.keys, requires_grad=True)

    def backward(out: torch.Tensor) -> None:
        out.backward(torch.ones_like(out))

    cases = {
        "hidden dropout, F.dropout": lambda: backward(F.dropout(hidden, args.p)),
        "hidden dropout, ours": lambda: backward(dropout(hidden, args.p)),
        "attention, torch SDPA": lambda: backward(
            F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=args.p)
        ),
        "attention, math_attention": lambda: backward(math_attention(q, k, v, bias, args.p)),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for rep in range(args.repeats):  # interleaved, rotating order, so load hits every case alike
        names = list(cases)
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            times[name] += timed(cases[name], 1)
    per_step = {"hidden": 7, "attention": 3}  # the last layer's 19-row attention is left out
    print(f"end: {step_flops.load_line()}\n")
    print(
        f"B={args.batch}, rows {args.rows}, keys {args.keys}, hidden {args.hidden}, {args.heads} heads, p={args.p}"
    )
    print("| case | ms fwd+bwd (median, min-max) | x per step | ms per step |")
    print("|---|---:|---:|---:|")
    for name, values in times.items():
        count = per_step["hidden" if name.startswith("hidden") else "attention"]
        median = statistics.median(values)
        print(
            f"| {name} | {median:.2f} ({min(values):.2f}-{max(values):.2f}) | {count} | {median * count:.1f} |"
        )


if __name__ == "__main__":
    main()
