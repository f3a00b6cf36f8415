"""What the checkpoint manifest (size + SHA-256 of every file, checkpoint/integrity.py) costs, for MPNet-base.

Writes an MPNet-base checkpoint (fp32 weights and both AdamW moments, about 1.3 GB) with Accelerate's
save_state, the way a training run does, then times, in turn and several times:
  save      accelerator.save_state (the baseline the manifest adds to)
  manifest  build_manifest: reading every file back and hashing it (added to every save, on rank 0)
  verify    verify_checkpoint: sizes, then every checksum (added to every resume, before loading)
  load      accelerator.load_state (the baseline of a resume)
Files are fresh in the page cache after a save, as in a run; on a network filesystem reads cost more.

    OMP_NUM_THREADS=2 python -m benchmarks.checkpoint_manifest [--repeats 3] [--dir /tmp/manifest_bench]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import torch

from benchmarks.machine import cpu_model


def _timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/manifest_bench"))
    args = parser.parse_args()

    from accelerate import Accelerator

    from mpnet_dist.checkpoint.integrity import build_manifest, verify_checkpoint
    from mpnet_dist.checkpoint.state import TrainState
    from mpnet_dist.model import MPNetConfig, MPNetForPretraining

    model = MPNetForPretraining(MPNetConfig(vocab_size=30592))  # MPNet-base: 12 x 768, 3072, 12 heads
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():  # one step's worth of optimizer state, without a forward pass
        p.grad = torch.zeros_like(p)
    optimizer.step()
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    folder = args.dir / "step-00000001"
    shutil.rmtree(args.dir, ignore_errors=True)

    def save() -> None:
        shutil.rmtree(folder, ignore_errors=True)
        accelerator.save_state(str(folder))

    save_s = _timed(save, args.repeats)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    manifest: dict = {}

    def build() -> None:
        manifest.update(build_manifest(folder))

    manifest_s = _timed(build, args.repeats)
    state = TrainState(step=1, model_config={}, tokenizer_name="x", manifest=manifest)
    verify_s = _timed(lambda: verify_checkpoint(folder, state), args.repeats)
    load_s = _timed(lambda: accelerator.load_state(str(folder)), args.repeats)

    load = os.getloadavg()
    print(
        f"# {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, load {load[0]:.1f} {load[1]:.1f}"
    )
    print(f"# checkpoint: {len(manifest)} files, {size / 2**30:.2f} GiB; median of {args.repeats} (all runs)")
    for name, times in (("save", save_s), ("manifest", manifest_s), ("verify", verify_s), ("load", load_s)):
        rate = size / statistics.median(times) / 2**20
        runs = ", ".join(f"{t:.2f}" for t in times)
        print(f"{name:<9} {statistics.median(times):6.2f} s  ({rate:,.0f} MiB/s)  [{runs}]")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
