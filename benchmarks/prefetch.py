"""Input overlap at GPU step times: data_wait_frac with and without the prefetcher, the device step simulated
by a sleep (which, like a GPU step, leaves the host CPU free).

    OMP_NUM_THREADS=1 python -m benchmarks.prefetch [--step-ms 55 --batch 32 --seq-len 512 --steps 40]

Data: the built-in corpus through the block cache and the real batch builder (what `--dataset-name builtin`
trains on), micro-batches of B x L, `--update-freq` per step. data_wait_frac = time in next(batches) / step
time, as the trainer logs it. The default step time is MPNet-base at B=32, L=512 on one H100 at the 300k
tokens/s target (derived, BENCHMARKS.md "Data starvation").
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
import types

import torch

from benchmarks import step_flops
from mpnet_dist.data import build_data, load_tokenizer
from mpnet_dist.data.prefetch import Prefetcher


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step-ms", type=float, default=55.0, help="simulated device step")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--update-freq", type=int, default=1)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--cache-dir", default=None, help="data cache (default: a temporary folder)")
    return p.parse_args()


def data_config(args: argparse.Namespace, cache: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        train_dir=None, valid_file=None, test_file=None, dataset_name="builtin", dataset_config=None,
        dataset_split="train", text_field="text", buffer_size=16, eval_samples=0, min_text_length=1,
        max_tokens=args.seq_len, batch_size=args.batch, update_freq=args.update_freq, num_workers=0, seed=1,
        packing=True, pred_prob=0.15, rand_prob=0.1, keep_prob=0.1, whole_word_mask=True, data_cache_dir=cache,
    )  # fmt: skip


def run(batches, args: argparse.Namespace) -> tuple[float, float]:
    """(data_wait_frac, mean step seconds) over --steps steps after one warm-up step."""
    waited = total = 0.0
    for step in range(args.steps + 1):
        start = time.perf_counter()
        for _ in range(args.update_freq):
            next(batches)
        fetched = time.perf_counter()
        time.sleep(args.step_ms / 1e3)  # the device step
        if step:  # the first step pays the pipeline's start-up
            waited += fetched - start
            total += time.perf_counter() - start
    return waited / total, total / args.steps


def main() -> None:
    args = parse_args()
    print(f"command: {shlex.join(['python', '-m', 'benchmarks.prefetch', *sys.argv[1:]])}")
    print(f"machine: {step_flops.machine_line(torch.device('cpu'))}")
    cache = args.cache_dir or tempfile.mkdtemp(prefix="mpnet_prefetch_")
    tokenizer = load_tokenizer("builtin", cache)
    cfg = data_config(args, cache)
    print(f"start: {step_flops.load_line()}")
    results = {}
    for name in ("in the step", "prefetched", "in the step ", "prefetched "):  # twice, alternating
        source = build_data(cfg, tokenizer, 0, 1).train
        batches = (
            Prefetcher(source, args.update_freq, torch.device("cpu")) if "prefetched" in name else source
        )
        results[name] = run(batches, args)
        if isinstance(batches, Prefetcher):
            batches.close()
    print(f"end: {step_flops.load_line()}\n")
    tokens = args.batch * args.seq_len * args.update_freq
    print(f"B={args.batch}, L={args.seq_len}, update-freq {args.update_freq} ({tokens:,} tokens per step), "
          f"simulated step {args.step_ms:.0f} ms, {args.steps} steps\n")  # fmt: skip
    print("| batches built | data_wait_frac | step ms (mean) |")
    print("|---|---:|---:|")
    for name, (frac, seconds) in results.items():
        print(f"| {name.strip()} | {frac:.4f} | {seconds * 1e3:.1f} |")


if __name__ == "__main__":
    main()
