"""The pieces of our step around attention, timed alone: attention kernels, the bias/mask, the loss.

    OMP_NUM_THREADS=1 python -m benchmarks.attention --threads 1 [--batch 8 --seq-len 256 --heads 4 \
        --head-dim 64 --vocab 30527 --dropout 0.1] [--before REV]

Cases, each forward + backward at the two-stream shape (T = L + 2p query rows, S = L + p keys):
  attention/<impl>  one layer's kernel.attend on q [B, nh, T, d], k/v [B, nh, S, d] with the shared mask,
                    for every kernel in ATTENTION_KERNELS (CPU: SDPA with a float mask takes the math
                    path when dropout > 0; flex has no dropout and no CPU backward: its CPU training
                    path is PyTorch's reference implementation, measured at dropout 0)
  inference/<impl>  the same forward only, under no_grad (flex: torch.compile's fused CPU kernel)
  bias/now          build_float_mask (relative-bias gather + two-stream mask), buckets from positions
  loss/now          prediction_loss over [B*p, V] logits
  bias/before, loss/before   the same functions as of git revision --before
Repetitions alternate the cases; medians of wall and process CPU time per call.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch

from benchmarks import step_flops
from benchmarks.train_throughput import load_before
from mpnet_dist import loss as loss_module
from mpnet_dist.model import attention as attention_module
from mpnet_dist.model import layout as layout_module
from mpnet_dist.model.config import MPNetConfig
from mpnet_dist.model.layout import AttentionLayout
from mpnet_dist.model.mpnet import SentenceEncoder


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=30527)
    p.add_argument("--dropout", type=float, default=0.1, help="attention dropout in the kernels")
    p.add_argument("--before", default=None, help="git revision for bias/before and loss/before")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args()


def two_stream_inputs(args: argparse.Namespace) -> tuple[SentenceEncoder, torch.Tensor, int]:
    """An encoder (for its bias table and bucket function) and permuted two-stream positions [B, L+2p]."""
    length, p = args.seq_len, max(1, round(0.15 * args.seq_len))
    config = MPNetConfig(
        vocab_size=128,
        encoder_layers=1,
        encoder_embed_dim=args.heads * args.head_dim,
        encoder_ffn_dim=4,
        encoder_attention_heads=args.heads,
        max_positions=max(512, length),
    )
    gen = torch.Generator().manual_seed(0)
    order = torch.stack([torch.randperm(length, generator=gen) for _ in range(args.batch)])
    positions = torch.cat([order, order[:, length - p :], order[:, length - p :]], dim=1)
    return SentenceEncoder(config), positions, p


def bias_case(encoder: SentenceEncoder, positions: torch.Tensor, p: int, module) -> Callable[[], None]:
    """Buckets + mask forward, then backward of a fixed upstream gradient into the bias table."""
    length = positions.shape[1] - 2 * p
    num_kv = length + p
    content = positions[:, :num_kv]
    rows = torch.cat([content, content[:, length:]], dim=1)
    table = encoder.relative_attention_bias
    heads = table.embedding_dim
    upstream = torch.randn(positions.shape[0], heads, length + 2 * p, num_kv)
    before = getattr(module, "relative_position_bucket", None) if module is not attention_module else None

    def run() -> None:
        if before is None:
            cfg = encoder.config
            buckets = layout_module.relative_buckets(
                content, rows, cfg.max_positions, cfg.relative_attention_num_buckets,
                cfg.relative_attention_max_distance,
            )  # fmt: skip
        else:  # the old SentenceEncoder.buckets: the bucket function on every [B, T, S] distance
            cfg = encoder.config
            relative = content[:, None, :] - rows[:, :, None]
            buckets = before(
                relative, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
            )
        masks = (
            getattr(module, "two_stream_mask", None) or layout_module.two_stream_mask
        )  # moved to layout.py
        blocked = masks(length, p, positions.device)[None]
        mask = module.build_float_mask(table, buckets, blocked, row_multiple=16)
        mask.backward(upstream)
        table.zero_grad(set_to_none=True)

    return run


def loss_case(args: argparse.Namespace, p: int, prediction_loss) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(args.batch, p, args.vocab, generator=gen) * 3
    targets = torch.randint(0, args.vocab, (args.batch, p), generator=gen)

    def run() -> None:
        leaf = logits.clone().requires_grad_()  # clone outside the timed part would keep one [N, V] alive
        loss_sum, _ = prediction_loss(leaf, targets)
        loss_sum.backward()

    return run


def attention_case(
    args: argparse.Namespace,
    encoder: SentenceEncoder,
    positions: torch.Tensor,
    p: int,
    impl: str,
    training: bool = True,
) -> Callable[[], None]:
    length = positions.shape[1] - 2 * p
    num_kv = length + p
    layout = AttentionLayout.for_two_stream(positions, p, None, encoder.config)
    kernel = attention_module.get_kernel(impl)
    with torch.no_grad():
        prepared = kernel.prepare(encoder.relative_attention_bias, layout)
    shape = (args.batch, args.heads, length + 2 * p, args.head_dim)
    q = torch.randn(shape, requires_grad=training)
    k = torch.randn(shape[0], shape[1], num_kv, shape[3], requires_grad=training)
    v = torch.randn(shape[0], shape[1], num_kv, shape[3], requires_grad=training)
    dropout = 0.0 if impl == "flex" or not training else args.dropout

    def run() -> None:
        if not training:
            with torch.no_grad():
                kernel.attend(q, k, v, prepared, 0.0)
            return
        out = kernel.attend(q, k, v, prepared, dropout)
        out.backward(torch.ones_like(out))

    return run


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"command: {shlex.join(['python', '-m', 'benchmarks.attention', *sys.argv[1:]])}")
    print(f"machine: {step_flops.machine_line(torch.device('cpu'))}")
    print("note: the first inference/flex call compiles FlexAttention's CPU kernel (untimed warm-up)")
    print(f"start: {step_flops.load_line()}")
    encoder, positions, p = two_stream_inputs(args)
    cases = {
        f"attention/{impl}": attention_case(args, encoder, positions, p, impl)
        for impl in attention_module.ATTENTION_KERNELS
    }
    for impl in attention_module.ATTENTION_KERNELS:
        cases[f"inference/{impl}"] = attention_case(args, encoder, positions, p, impl, training=False)
    cases["bias/now"] = bias_case(encoder, positions, p, attention_module)
    cases["loss/now"] = loss_case(args, p, loss_module.prediction_loss)
    if args.before:
        old = load_before(args.before)
        cases["bias/before"] = bias_case(encoder, positions, p, old["attention"])
        cases["loss/before"] = loss_case(args, p, old["loss"].prediction_loss)
    for run in cases.values():
        run()  # warm-up
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, run in cases.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            run()
            times[name].append((time.perf_counter() - start, time.process_time() - cpu_start))
    print(f"end: {step_flops.load_line()}")
    length = args.seq_len
    print(
        f"\nB={args.batch}, L={length}, p={p}: T={length + 2 * p} rows x S={length + p} keys, "
        f"{args.heads} heads x {args.head_dim}, vocab {args.vocab}, attention dropout {args.dropout}; "
        f"{args.repeats} reps, forward + backward per call\n"
    )
    print("| case | wall ms (median) | CPU ms (median) | CPU ms min-max |")
    print("|---|---:|---:|---:|")
    for name, values in times.items():
        wall, cpu = [v[0] for v in values], [v[1] for v in values]
        print(
            f"| {name} | {statistics.median(wall) * 1e3:.1f} | {statistics.median(cpu) * 1e3:.1f} "
            f"| {min(cpu) * 1e3:.1f}-{max(cpu) * 1e3:.1f} |"
        )
    for part in ("bias", "loss"):
        if f"{part}/before" in times:
            ratios = [a[1] / b[1] for a, b in zip(times[f"{part}/now"], times[f"{part}/before"], strict=True)]
            print(f"{part}: now / before, median of per-rep CPU-time ratios {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
