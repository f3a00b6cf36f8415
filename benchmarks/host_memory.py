"""The training step with glibc's default allocator thresholds against keep_freed_memory() (as the trainer
sets them on CPU), in alternating child processes (the setting is process-wide).

    OMP_NUM_THREADS=1 python -m benchmarks.host_memory --threads 1 --rounds 4 [train_throughput size flags]

Each child builds the `ours` variant of benchmarks/train_throughput.py, warms up, then times --steps steps:
median wall and CPU time per step, system time and minor page faults per step.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import statistics
import subprocess
import sys
import time

import torch

from benchmarks import step_flops


def child(mode: str, argv: list[str], steps: int) -> None:
    from mpnet_dist.host_memory import keep_freed_memory

    if mode == "kept" and not keep_freed_memory():
        raise SystemExit("needs glibc")
    from accelerate import Accelerator

    from benchmarks.train_throughput import Variant, build_batches, parse_args, run_steps

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variant = Variant("ours", args, Accelerator(cpu=True))
    batches, _ = build_batches(args)
    run_steps(variant, batches, args.warmup, 0, torch.device("cpu"))
    rows = []
    for index in range(steps):
        usage = resource.getrusage(resource.RUSAGE_SELF)
        wall, cpu = run_steps(variant, batches, 1, index, torch.device("cpu"))
        after = resource.getrusage(resource.RUSAGE_SELF)
        rows.append((wall, cpu, after.ru_stime - usage.ru_stime, after.ru_minflt - usage.ru_minflt))
    print(json.dumps([statistics.median(column) for column in zip(*rows, strict=True)]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4, help="child pairs (default, kept), alternating")
    p.add_argument("--steps", type=int, default=4, help="timed steps per child")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.child:
        child(args.child, rest, args.steps)
        return
    print(f"command: {shlex.join(['python', '-m', 'benchmarks.host_memory', *sys.argv[1:]])}")
    print(f"machine: {step_flops.machine_line(torch.device('cpu'))}")
    print(f"start: {step_flops.load_line()}")
    results: dict[str, list[list[float]]] = {"default": [], "kept": []}
    for round_ in range(args.rounds):
        for mode in ("default", "kept") if round_ % 2 == 0 else ("kept", "default"):
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.host_memory",
                "--child",
                mode,
                "--steps",
                str(args.steps),
                *rest,
            ]
            start = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
            wall, cpu, sys_s, faults = results[mode][-1]
            print(f"round {round_} {mode}: step {wall * 1e3:.0f} ms wall, {cpu * 1e3:.0f} ms CPU, "
                  f"{sys_s * 1e3:.0f} ms system, {faults:,.0f} page faults ({time.perf_counter() - start:.0f} s) "
                  f"| {step_flops.load_line()}", flush=True)  # fmt: skip
    print(f"end: {step_flops.load_line()}\n")
    print("| allocator | step ms (median) | CPU ms | system ms | minor page faults per step |")
    print("|---|---:|---:|---:|---:|")
    for mode, rows in results.items():
        cells = [statistics.median(column) for column in zip(*rows, strict=True)]
        print(
            f"| {mode} | {cells[0] * 1e3:.0f} | {cells[1] * 1e3:.0f} | {cells[2] * 1e3:.0f} | {cells[3]:,.0f} |"
        )
    ratios = [d[1] / k[1] for d, k in zip(results["default"], results["kept"], strict=True)]
    print(f"\nCPU time default / kept, median of per-round ratios: {statistics.median(ratios):.3f}x")


if __name__ == "__main__":
    main()
