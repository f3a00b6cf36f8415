"""`train_throughput --profile N`: self time per operator and step, one column per variant."""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks import step_flops


def profile(variants: list, batches_of: dict, steps: int, device: torch.device, run_steps: Callable) -> None:
    """Self time per operator and step, one column per variant: where each step spends its time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    columns: dict[str, dict[str, float]] = {}
    for v in variants:
        with torch_profile(activities=activities) as prof:
            run_steps(v, batches_of[v.name], steps, 0, device)
        columns[v.name] = {e.key: getattr(e, attr) / 1e3 / steps for e in prof.key_averages()}
    ops = sorted(
        {k for c in columns.values() for k in c}, key=lambda k: -max(c.get(k, 0) for c in columns.values())
    )
    print(f"\nself time per step, ms ({steps} profiled steps each)\n")
    print("| op | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for op in ops[:30]:
        print(f"| {op} | " + " | ".join(f"{c.get(op, 0.0):.1f}" for c in columns.values()) + " |")
    print("| total | " + " | ".join(f"{sum(c.values()):.1f}" for c in columns.values()) + " |")
    print(f"end: {step_flops.load_line()}")
