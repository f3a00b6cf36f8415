"""Steady-state cost of the multi-node heartbeat (mpnet_dist/nodes.py): per beat, and per training step.

    python benchmarks/node_heartbeat.py --steps 200 --repeats 2 --out /tmp/mpnet-heartbeat

1. One beat: what a node's first process does every --node-timeout-s / 6 seconds (add to its counter, read the
   other nodes' counters from the launchers' TCP store), here over loopback against a store in this process:
   wall and CPU time per beat, for 2 and 64 nodes.
2. End to end: 2 "nodes" on this host (two `accelerate launch --num_machines 2`, 1 process each, DDP over gloo on
   loopback, so the heartbeat runs), a small model, median seconds per step from metrics.jsonl with
   --node-timeout-s 0 (off), 30 (the default: a beat every 5 s) and 6 (a beat every second, 5x the default rate,
   to make any cost visible), interleaved off/default/fast, `--repeats` rounds. (At 3 s, a beat every 0.5 s, a
   run at load 27 on 2 cores once reported a live node as lost: very short timeouts are not safe on an
   oversubscribed host.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import conftest  # noqa: E402,F401  (1 thread per rank, gloo on loopback, offline)
from benchmarks.machine import cpu_model  # noqa: E402
from mpnet_dist.metrics import read_metrics  # noqa: E402
from tests.helpers import CONFIGS, free_port, launch_cmd, launch_env, tiny_args  # noqa: E402

VARIANTS = {"off": "0", "default (30 s)": "30", "fast (6 s)": "6"}


def beat_cost(nodes: int, beats: int = 2000) -> dict:
    from torch.distributed import TCPStore

    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    client = TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=30))
    keys = [f"beat/{n}" for n in range(1, nodes)]
    for n in range(nodes):
        client.add(f"beat/{n}", 1)
    wall, cpu = time.perf_counter(), time.process_time()  # process time includes the store's server thread
    for _ in range(beats):
        client.add("beat/0", 1)
        client.multi_get(keys)
    return {"nodes": nodes, "wall_us": 1e6 * (time.perf_counter() - wall) / beats,
            "cpu_us": 1e6 * (time.process_time() - cpu) / beats}  # fmt: skip


def build_corpus(root: Path) -> dict:
    """The test suite's tiny corpus and tokenizer (tests/corpus.py), built once under `root`."""
    from mpnet_dist.data import train_tokenizer
    from tests.corpus import write_corpus

    paths = write_corpus(root)
    if not (root / "tokenizer").is_dir():
        train_tokenizer((paths["train_dir"] / "part1.txt").read_text().splitlines(), root / "tokenizer", 600)
    return {**paths, "tokenizer": root / "tokenizer", "cache": root / "cache"}


def run_once(corpus: dict, out: Path, name: str, timeout_s: str, steps: int) -> float:
    run_dir = out / name
    args = tiny_args(corpus, run_dir, "--total-updates", str(steps), "--eval-interval-steps", "0",
                     "--logging-steps", "10", "--encoder-embed-dim", "128", "--encoder-ffn-dim", "512",
                     "--encoder-layers", "4", "--max-tokens", "64", "--batch-size", "8", "--update-freq", "1",
                     "--node-timeout-s", timeout_s)  # fmt: skip
    port, env = str(free_port()), launch_env()
    procs = []
    for rank in (0, 1):
        flags = ("--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                 "--main_process_ip", "127.0.0.1", "--main_process_port", port)  # fmt: skip
        log = open(out / f"{name}_node{rank}.log", "wb")  # noqa: SIM115
        procs.append(subprocess.Popen(launch_cmd(CONFIGS / "cpu_2proc.yaml", args, *flags), cwd=REPO, env=env,
                                      stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
    if any(p.wait(timeout=1800) for p in procs):
        raise RuntimeError(f"{name} failed; see {out}/{name}_node0.log")
    records = [r for r in read_metrics(run_dir) if r["split"] == "train"]
    per_step = [
        (b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"])
        for a, b in zip(records, records[1:], strict=False)
    ]
    return statistics.median(per_step[1:])  # the first window holds warm-up


def say(text: str) -> None:
    print(text, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/mpnet-heartbeat"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    say(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    beats = [beat_cost(n) for n in (2, 64)]
    for b in beats:
        say(f"one beat, {b['nodes']} nodes: {b['wall_us']:.0f} us wall, {b['cpu_us']:.0f} us CPU")
    corpus = build_corpus(args.out / "corpus")
    results: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_ in range(args.repeats):
        for name, timeout_s in VARIANTS.items():
            tag = f"r{round_}_{timeout_s}"
            seconds = run_once(corpus, args.out, tag, timeout_s, args.steps)
            results[name].append(seconds)
            say(f"round {round_} {name:>15}: {1000 * seconds:.1f} ms/step (load {os.getloadavg()[0]:.1f})")
    for name, values in results.items():
        say(f"{name:>15}: median {1000 * statistics.median(values):.1f} ms/step over {len(values)} run(s)")
    (args.out / "heartbeat.json").write_text(json.dumps({"beats": beats, "ms_per_step": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
