"""Soak test (not in CI): a tiny model on 2 CPU processes, killed at random and resumed, must end with the
weights of an uninterrupted run, bit for bit.

    python benchmarks/soak.py --steps 2000 --kills 8 --out /tmp/mpnet-soak
    python benchmarks/soak.py --steps 1000 --kills 6 --world-sizes 2,3,1,4 --configs cpu_2proc.yaml,deepspeed_zero2.yaml

Elastic mode (--world-sizes, optionally --configs): every launch of the chaos run takes the next process count
(and launch config) of the lists, so each resume is on another number of processes (or kind: DDP, ZeRO); both
runs train without dropout at --global-batch-size 24 with --batch-size 2, and the result must be within
--tolerance (1e-5) of the uninterrupted 2-process run: weights, every logged loss, the same data position.

An uninterrupted reference run goes on in the background while the chaos run is started with --resume, then
SIGKILLed (a random rank, the launcher, or a rank caught while a checkpoint is being written) at random steps,
over and over; after the last kill it runs to the end. Checks after every kill: every process gone in bounded
time, no incomplete folder under a checkpoint name. At the end: final weights, every logged training loss and
the data position equal the reference's. Writes OUT/soak.json and prints a summary (RELIABILITY.md has one).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import conftest  # noqa: E402,F401  (the test environment: 1 thread per rank, gloo on loopback, offline)
from mpnet_dist.checkpoint import is_complete, latest_checkpoint  # noqa: E402
from mpnet_dist.checkpoint.state import read_data_state  # noqa: E402
from tests.helpers import CONFIGS, NO_DROPOUT, launch_cmd, launch_env, tiny_args, train_losses, weights  # noqa: E402

VICTIMS = ("rank0", "last-rank", "launcher", "mid-save")
ELASTIC = (*NO_DROPOUT, "--batch-size", "2", "--global-batch-size", "24")
GONE_DEADLINE_S = 90.0


def launch(corpus: dict, run_dir: Path, steps: int, *extra: str, config: str = "cpu_2proc.yaml",
           processes: int = 2) -> subprocess.Popen:  # fmt: skip
    # --logging-steps 1: a logged loss averages the steps since the previous log, and a run resumed between two
    # log steps starts a shorter window; logging every step makes every logged loss comparable bit for bit.
    args = tiny_args(corpus, run_dir, "--total-updates", str(steps), "--checkpoint-interval", "50",
                     "--keep-checkpoints", "3", "--eval-interval-steps", "250", "--logging-steps", "1", *extra)  # fmt: skip
    env = launch_env()
    env.pop("MPNET_DIST_TIMEOUT_S", None)  # the product default, as a user runs it
    log = open(run_dir.parent / f"{run_dir.name}.log", "ab")  # noqa: SIM115  (outlives this function)
    cmd = launch_cmd(CONFIGS / config, args, "--num_processes", str(processes), "--main_process_port", "0")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def workers(launcher: subprocess.Popen, processes: int) -> list[psutil.Process]:
    while True:
        kids = [k for k in psutil.Process(launcher.pid).children() if "RANK" in k.environ()]
        if len(kids) == processes:
            return sorted(kids, key=lambda k: int(k.environ()["RANK"]))
        if launcher.poll() is not None:
            raise RuntimeError(f"launcher exited ({launcher.returncode}) before starting its workers")
        time.sleep(0.1)


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def last_step(run_dir: Path) -> int:
    """The newest logged training step (metrics.jsonl, rank 0), 0 before the first."""
    try:
        with open(run_dir / "metrics.jsonl", "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 4096))
            lines = fh.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def kill_once(corpus: dict, run_dir: Path, steps: int, target: int, victim: str, rng: random.Random,
              launch_as: dict, extra: tuple[str, ...]) -> dict:  # fmt: skip
    started = time.monotonic()
    launcher = launch(corpus, run_dir, steps, "--resume", *extra, **launch_as)
    ranks = workers(launcher, launch_as["processes"])
    while last_step(run_dir) < target:
        if launcher.poll() is not None:
            raise RuntimeError(f"run ended (exit {launcher.returncode}) before step {target}")
        time.sleep(0.05)
    writing = None
    if victim == "mid-save":  # wait (2 ms polls) for a checkpoint folder being written now, then kill a rank
        pid, since = rng.choice(ranks).pid, time.time()
        while writing is None and time.time() < since + 60:
            writing = next((e.name for e in os.scandir(run_dir) if e.name.startswith(".tmp-")
                            and e.stat().st_mtime > since), None)  # fmt: skip
            time.sleep(0.002)
    else:
        pid = launcher.pid if victim == "launcher" else ranks[0 if victim == "rank0" else -1].pid
    at_step = last_step(run_dir)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    launcher.wait(timeout=300)
    while any(alive(p) for p in ranks):
        if time.monotonic() - killed > 300:
            raise RuntimeError(f"{victim} killed: workers still alive after 300 s (a hang)")
        time.sleep(0.1)
    gone = time.monotonic() - killed
    # The kill really landed mid-save if the folder it was writing is still there, unfinished.
    interrupted = writing if writing and (run_dir / writing).is_dir() else None
    named = [p for p in run_dir.iterdir() if p.name.startswith("step-") or p.name in ("best", "final")]
    incomplete = [p.name for p in named if not (p / "converted.json" if p.suffix == ".universal" else p).exists()
                  or (p.suffix != ".universal" and not is_complete(p))]  # fmt: skip
    assert not incomplete, f"incomplete folders under checkpoint names: {incomplete}"
    latest = latest_checkpoint(run_dir)
    resumed_from = json.loads((latest / "train_state.json").read_text())["step"] if latest else 0
    return {"victim": victim, **launch_as, "target_step": target, "logged_step_at_kill": at_step,
            "interrupted_save": interrupted,
            "launcher_exit": launcher.returncode, "seconds_until_all_gone": round(gone, 1),
            "newest_complete_checkpoint": resumed_from, "preempted": (run_dir / "PREEMPTED").is_file(),
            "seconds_this_launch": round(killed - started, 1)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/mpnet-soak"))
    parser.add_argument(
        "--world-sizes", default="", help="elastic mode: process counts of the launches, in turn"
    )
    parser.add_argument("--configs", default="cpu_2proc.yaml", help="launch configs of the launches, in turn")
    parser.add_argument(
        "--tolerance", type=float, default=1e-5, help="elastic mode: largest weight/loss diff"
    )
    parser.add_argument("--lr", default="0.003", help="peak learning rate of both runs")
    opts = parser.parse_args()
    rng = random.Random(opts.seed)
    opts.out.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(opts.out / "corpus")
    elastic = bool(opts.world_sizes)
    sizes = [int(w) for w in opts.world_sizes.split(",")] if elastic else [2]
    configs = opts.configs.split(",")
    extra = (*(ELASTIC if elastic else ()), "--lr", opts.lr)
    t0 = time.monotonic()
    reference_dir, chaos_dir = opts.out / "reference", opts.out / "chaos"
    reference = launch(corpus, reference_dir, opts.steps, *extra)
    # Kill steps spread over the run (one per equal segment, at a random point in it), victims in turn.
    segment = (opts.steps - 100) / opts.kills
    targets = [int(60 + segment * i + rng.random() * segment * 0.8) for i in range(opts.kills)]
    victims = [VICTIMS[i % len(VICTIMS)] for i in range(opts.kills)]
    rng.shuffle(victims)
    launches = [
        {"config": configs[i % len(configs)], "processes": sizes[i % len(sizes)]}
        for i in range(opts.kills + 1)
    ]
    kills = []
    for target, victim, launch_as in zip(targets, victims, launches, strict=False):
        kills.append(kill_once(corpus, chaos_dir, opts.steps, target, victim, rng, launch_as, extra))
        print(json.dumps(kills[-1]), flush=True)
    final = launch(corpus, chaos_dir, opts.steps, "--resume", *extra, **launches[-1])
    assert final.wait() == 0, f"the last resume failed; see {chaos_dir}.log"
    assert reference.wait() == 0, f"the reference run failed; see {reference_dir}.log"
    wall = time.monotonic() - t0
    summary = compare(reference_dir, chaos_dir)
    summary.update(
        steps=opts.steps, kills=kills, last_launch=launches[-1], wall_s=round(wall, 1), seed=opts.seed
    )
    (opts.out / "soak.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "kills"}, indent=2))
    if elastic:
        ok = max(summary["max_abs_weight_diff"], summary["max_abs_loss_diff"]) < opts.tolerance
    else:
        ok = summary["weights_bitwise_equal"] and summary["losses_bitwise_equal"]
    ok = ok and summary["same_data_position"] and summary["logged_steps"] == opts.steps
    worst = max(k["seconds_until_all_gone"] for k in kills)
    print(f"{'PASS' if ok and worst < GONE_DEADLINE_S else 'FAIL'}: {len(kills)} kills, worst exit {worst}s")
    return 0 if ok and worst < GONE_DEADLINE_S else 1


def compare(reference_dir: Path, chaos_dir: Path) -> dict:
    a, b = (
        weights(reference_dir),
        weights(chaos_dir),
    )  # model.safetensors, or a ZeRO checkpoint's fp32 masters
    la, lb = train_losses(reference_dir), train_losses(chaos_dir)
    da, db = (read_data_state(d / "final", 0) for d in (reference_dir, chaos_dir))
    sa, sb = (json.loads((d / "final" / "train_state.json").read_text()) for d in (reference_dir, chaos_dir))
    return {
        "weights_bitwise_equal": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
        "max_abs_weight_diff": max((a[k].float() - b[k].float()).abs().max().item() for k in a),
        "losses_bitwise_equal": la == lb,
        "max_abs_loss_diff": max(abs(la[s] - lb[s]) for s in la) if la.keys() == lb.keys() else float("inf"),
        "logged_steps": len(lb),
        # blocks consumed (global, process-count free) and tokens seen
        "same_data_position": da.blocks_consumed == db.blocks_consumed and sa["tokens"] == sb["tokens"],
        "final_step": sb["step"],
        "final_world_size": sb["world_size"],
    }


def build_corpus(root: Path) -> dict:
    from mpnet_dist.data import train_tokenizer
    from tests.corpus import write_corpus

    if not (root / "tokenizer").is_dir():
        paths = write_corpus(root)
        texts = (paths["train_dir"] / "part1.txt").read_text().splitlines()
        train_tokenizer(texts, root / "tokenizer", vocab_size=600)
    return {"train_dir": root / "train", "valid": root / "valid.txt", "test": root / "test.txt",
            "tokenizer": root / "tokenizer", "cache": root / "cache"}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
