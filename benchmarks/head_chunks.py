"""The fused CPU LM head (mpnet_dist.loss._ChunkedProjectionLoss) at several vocabulary chunk sizes, against the
plain composition (F.linear, then prediction_loss): forward + backward of head projection and loss alone.

    OMP_NUM_THREADS=1 python -m benchmarks.head_chunks --threads 1 --rows 304 --hidden 256 --chunks 512,1024,2048,4096

--rows is the number of predicted tokens per micro-batch (B x p: 16 x 19 = 304 at L=128, B=16). Repetitions
alternate the variants; the table gives the median ms per variant. Chunk 0 is the plain composition.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks import step_flops
from mpnet_dist.loss import _ChunkedProjectionLoss, prediction_loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, default=304)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=30527)
    p.add_argument("--chunks", default="512,1024,2048,4096")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hidden = torch.randn(args.rows, args.hidden)
    weight, bias = torch.randn(args.vocab, args.hidden) * 0.05, torch.zeros(args.vocab)
    targets = torch.randint(0, args.vocab, (args.rows,))
    variants = [0] + [int(c) for c in args.chunks.split(",")]

    def run(chunk: int) -> float:
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        start = time.perf_counter()
        if chunk:
            loss, _ = _ChunkedProjectionLoss.apply(*leaves, targets, chunk)
        else:
            loss, _ = prediction_loss(F.linear(*leaves)[None], targets[None])
        loss.backward()
        return (time.perf_counter() - start) * 1e3

    print(f"start: {step_flops.load_line()}")
    times: dict[int, list[float]] = {v: [] for v in variants}
    for v in variants:
        run(v)  # warm-up
    for rep in range(args.repeats):
        order = variants[rep % len(variants) :] + variants[: rep % len(variants)]
        for v in order:
            times[v].append(run(v))
    print(f"end: {step_flops.load_line()}")
    print(
        f"\n{args.rows} rows x {args.hidden} against {args.vocab} x {args.hidden}, {args.threads} thread(s)\n"
    )
    print("| chunk | forward + backward ms (median, min-max) |\n|---|---|")
    for v, ts in times.items():
        label = "whole vocabulary (F.linear + prediction_loss)" if v == 0 else f"{v:,}"
        print(f"| {label} | {statistics.median(ts):.1f} ({min(ts):.1f}-{max(ts):.1f}) |")


if __name__ == "__main__":
    main()
