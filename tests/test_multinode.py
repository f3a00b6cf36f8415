"""Several nodes for real: two hosts made of network namespaces (tests/netns.py), the README's command on each.

No GLOO_SOCKET_IFNAME (the trainer must choose), the head named by its host name (on the head itself that name
resolves to 127.0.1.1, as on a stock Debian host), one process per node, the default collective timeout (30 min).
One module fixture runs everything; launches run at once (they mostly wait on imports and on each other):
  ddp     DDP, 20 steps; node 1's launcher and worker SIGKILLed two steps after a checkpoint -> the head exits
          within a minute naming node 1; `--resume` on both nodes repeats the steps after the checkpoint bit for
          bit and ends equal to 1 process at the same global batch
  zero3   ZeRO-3 (GLOO_SOCKET_IFNAME=eth0 set: the override); the head frozen and unplugged after a checkpoint ->
          node 1 exits within a minute naming the head; `--resume` ends equal to 1 process
  alone   node 0 / node 1 started without the other          -> each exits, naming the missing side
The DDP checkpoint also resumes on one node (one process, same global batch).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests import corpus, netns
from tests.helpers import (
    CONFIGS,
    NO_DROPOUT,
    REPO,
    launch_env,
    max_loss_diff,
    max_weight_diff,
    tail,
    tiny_args,
    train,
    train_losses,
    train_state,
    weights,
)

tiny_corpus = corpus.tiny_corpus  # session fixture

# 2 nodes x batch 4 vs 1 process x batch 8: only the reduction order differs (ZeRO-3: plus DeepSpeed's bucketing)
LOSS_TOL = 1e-5
PARTITION_ALL = json.dumps(
    {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
)  # shard tiny params
HEAD = "host0"  # --main_process_ip as SLURM gives it: a host name
STEPS, EVERY = 20, 5  # steps per run, checkpoint interval
RDZV = ("--rdzv_conf", "timeout=15")  # the README's launcher rendezvous timeout
LOST_WITHIN_S = 60
_ports = iter(range(29400, 29500))


def readme_command(config: str, rank: int, port: int, *flags: str, args: list[str]) -> list[str]:
    """README "Several nodes", with --num_processes 2 (1 per node) and fp32 (the configs say bf16 for GPUs)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
            "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
            "--main_process_ip", HEAD, "--main_process_port", str(port), *RDZV, "--mixed_precision", "no", *flags,
            "-m", "mpnet_dist.train", *args]  # fmt: skip


def node_env(**extra: str) -> dict[str, str]:
    env = launch_env(**extra)
    for var in (
        "GLOO_SOCKET_IFNAME",
        "NCCL_SOCKET_IFNAME",
        "MPNET_DIST_TIMEOUT_S",
    ):  # choose; default timeout
        if var not in extra:
            env.pop(var, None)
    return env


class Job:
    """One launch per node of a 2-node job on the test hosts; records when each launch exits."""

    def __init__(self, hosts, name: str, root: Path, config: str, args: list[str], *flags: str, nodes=(0, 1),
                 env: dict | None = None):  # fmt: skip
        port = next(_ports)
        self.logs = {r: root / f"{name}_node{r}.log" for r in nodes}
        self.procs, self.ended, self.ended_wall = {}, {}, {}
        self.started = time.monotonic()
        for r in nodes:
            argv = readme_command(config, r, port, *flags, args=args)
            self.procs[r] = hosts.popen(r, argv, self.logs[r], cwd=REPO, env=env or node_env())
            threading.Thread(target=self._note_exit, args=(r,), daemon=True).start()

    def _note_exit(self, rank: int) -> None:
        self.procs[rank].wait()
        self.ended_wall[rank] = time.time()
        self.ended[rank] = time.monotonic()

    def log(self, rank: int) -> str:
        return self.logs[rank].read_text(errors="replace")

    def wait(self, rank: int, timeout: float = 300) -> int:
        try:
            code = self.procs[rank].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return -999
        while rank not in self.ended:
            time.sleep(0.01)
        return code

    def exit_after(self, rank: int, since: float, timeout: float = 180) -> tuple[int, float]:
        """(exit code, seconds from `since` to the exit); -999 if still running after `timeout`."""
        code = self.wait(rank, timeout)
        return code, (self.ended[rank] - since) if code != -999 else float("inf")

    def finish(self) -> None:
        for r in self.procs:
            code = self.wait(r)
            assert code == 0, f"node {r} exited with {code}:\n{tail(self.logs[r])}"


def _args(corpus, run_dir: Path, *extra: str) -> list[str]:
    return tiny_args(corpus, run_dir, *NO_DROPOUT, "--total-updates", str(STEPS), "--checkpoint-interval",
                     str(EVERY), "--eval-interval-steps", "0", *extra)  # fmt: skip


def _wait_for(done, job: Job, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline and all(p.poll() is None for p in job.procs.values()), (
            f"no {what} while the job ran:\n{tail(job.logs[0])}"
        )
        time.sleep(0.05)


def _logged(run_dir: Path) -> list[int]:
    try:
        return list(train_losses(run_dir))
    except (FileNotFoundError, ValueError):  # not written yet, or a line half-written
        return []


@pytest.fixture(scope="module")
def hosts():
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    made = netns.Hosts(2)
    try:
        yield made.up()
    finally:
        made.close()


@pytest.fixture(scope="module")
def runs(hosts, tiny_corpus, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("multinode")
    d = {name: root / name for name in ("ddp", "zero3", "single", "one_node")}
    zero_env = node_env(MPNET_DIST_DEEPSPEED_OVERRIDES=PARTITION_ALL, GLOO_SOCKET_IFNAME="eth0")
    jobs = {
        # LOGLEVEL=INFO: the launcher logs when it starts waiting for the other node (the clock for these two)
        **{f"alone{r}": Job(hosts, f"alone{r}", root, "ddp_8gpu.yaml", _args(tiny_corpus, root / "alone"),
                            nodes=(r,), env=node_env(LOGLEVEL="INFO")) for r in (0, 1)},
        "ddp": Job(hosts, "ddp", root, "ddp_8gpu.yaml", _args(tiny_corpus, d["ddp"])),
        "zero3": Job(hosts, "zero3", root, "deepspeed_zero3.yaml", _args(tiny_corpus, d["zero3"]), env=zero_env),
    }  # fmt: skip
    out: dict = {"dirs": d, "jobs": jobs}
    ddp, zero3 = jobs["ddp"], jobs["zero3"]
    _wait_for(lambda: max(_logged(d["ddp"]), default=0) >= EVERY + 2, ddp, f"step {EVERY + 2}")
    out["before_kill"] = train_losses(d["ddp"])  # the resumed run must repeat the steps after the checkpoint
    hosts.kill(ddp.procs[1])  # node 1's launcher and its worker
    out["killed"] = ddp.exit_after(0, time.monotonic())
    _wait_for(lambda: (d["zero3"] / f"step-{EVERY:08d}" / "train_state.json").exists(), zero3, "a checkpoint")
    hosts.kill(zero3.procs[0], signal.SIGSTOP)  # the head freezes and drops off the network: no reset is sent
    hosts.unplug(0)
    frozen_at = time.monotonic()
    # The single-process reference (batch 8 = 2 nodes x batch 4) trains while node 1 notices.
    assert train(tiny_args(tiny_corpus, d["single"], *NO_DROPOUT, "--batch-size", "8", "--total-updates",
                           str(STEPS), "--eval-interval-steps", "0")) == 0  # fmt: skip
    out["frozen"] = zero3.exit_after(1, frozen_at)
    hosts.kill(zero3.procs[0])
    zero3.wait(0)
    hosts.plug(0)
    ddp.wait(1)
    jobs["ddp_resumed"] = Job(
        hosts, "ddp_resumed", root, "ddp_8gpu.yaml", _args(tiny_corpus, d["ddp"], "--resume")
    )
    jobs["zero3_resumed"] = Job(hosts, "zero3_resumed", root, "deepspeed_zero3.yaml",
                                _args(tiny_corpus, d["zero3"], "--resume"), env=zero_env)  # fmt: skip
    out["alone"] = {
        r: jobs[f"alone{r}"].exit_after(r, _rendezvous_began(jobs[f"alone{r}"], r)) for r in (0, 1)
    }
    one = tiny_args(tiny_corpus, d["one_node"], *NO_DROPOUT, "--batch-size", "8", "--total-updates", str(STEPS),
                    "--eval-interval-steps", "0", "--resume-checkpoint", str(d["ddp"] / f"step-{EVERY:08d}"))  # fmt: skip
    jobs["ddp_resumed"].finish()  # before the one-node run: both read the 2-host checkpoint
    assert train(one) == 0
    jobs["zero3_resumed"].finish()
    return out


def _rendezvous_began(job: Job, rank: int) -> float:
    """When the launcher started waiting for the other node (torch elastic's INFO line), on the monotonic clock."""
    job.wait(rank)
    found = re.search(r"^I\d{4} (\d\d):(\d\d):(\d\d\.\d+) .*Rendezvous'ing worker group", job.log(rank), re.M)
    assert found, job.log(rank)[-3000:]
    h, m, sec = int(found.group(1)), int(found.group(2)), float(found.group(3))
    now = time.localtime(job.ended_wall[rank])
    began_wall = time.mktime((*now[:3], h, m, 0, 0, 0, -1)) + sec
    return job.ended[rank] - (job.ended_wall[rank] - began_wall)


def test_nodes_choose_the_interface_that_routes_to_the_head(runs):
    log0, log1 = runs["jobs"]["ddp"].log(0), runs["jobs"]["ddp"].log(1)
    first = "\n".join(log0.splitlines()[:5])
    assert (
        "node 0: network interface eth0 (10.213.7.1 routes to node 1 (host1, 10.213.7.2, rank 1)" in first
    ), log0
    assert (
        "node 1: network interface eth0 (10.213.7.2 routes to MASTER_ADDR host0; set GLOO_SOCKET_IFNAME)"
        in log1
    )
    assert "nodes: node 0 (host0, 10.213.7.1, rank 0); node 1 (host1, 10.213.7.2, rank 1)" in log0
    zero = runs["jobs"]["zero3"].log(1)
    assert (
        "network interface eth0 (GLOO_SOCKET_IFNAME set by you)" in zero
    )  # the variable overrides the choice


def test_killed_node_stops_the_head_and_resume_continues_exactly(runs):
    d, (code, seconds) = runs["dirs"], runs["killed"]
    log = runs["jobs"]["ddp"].log(0)
    print(f"node 1 SIGKILLed: the head exited with {code} after {seconds:.1f} s")
    assert code not in (0, -999) and seconds < LOST_WITHIN_S, tail(runs["jobs"]["ddp"].logs[0])
    assert "lost the connection to node 1 (host1, 10.213.7.2, rank 1)" in log, log[-3000:]
    resumed_log = runs["jobs"]["ddp_resumed"].log(0)
    start = int(re.search(r"resumed from \S*step-(\d+) at step", resumed_log).group(1))
    before, after = runs["before_kill"], train_losses(d["ddp"])
    repeated = range(start + 1, max(before) + 1)
    assert start % EVERY == 0 and len(repeated) >= 2 and sorted(after) == list(range(1, STEPS + 1))
    assert all(after[s] == before[s] for s in repeated), (start, before, after)  # bit for bit
    state = train_state(d["ddp"])
    assert (state["step"], state["world_size"], state["distributed_type"]) == (
        STEPS,
        2,
        "DistributedType.MULTI_CPU",
    )
    diff = max_loss_diff(after, train_losses(d["single"]), range(1, STEPS + 1))
    print(f"DDP on 2 hosts (killed, resumed) vs 1 process: max loss diff {diff:.2e}")
    assert diff < LOSS_TOL


def test_zero3_on_two_hosts_survives_a_frozen_head_and_resumes(runs):
    d, (code, seconds) = runs["dirs"], runs["frozen"]
    log = runs["jobs"]["zero3"].log(1)
    print(f"ZeRO-3: head frozen and unplugged; node 1 exited with {code} after {seconds:.1f} s")
    assert code not in (0, -999) and seconds < LOST_WITHIN_S, tail(runs["jobs"]["zero3"].logs[1])
    assert "head node's store at host0" in log and "node 0 (host0, 10.213.7.1, rank 0)" in log, log[-3000:]
    state = train_state(d["zero3"])
    assert (state["step"], state["world_size"], state["zero_stage"]) == (STEPS, 2, 3)
    resumed_log = runs["jobs"]["zero3_resumed"].log(0)
    assert re.search(r"resumed from \S*step-000000(05|10|15) at step", resumed_log), resumed_log[-3000:]
    losses, one = train_losses(d["zero3"]), train_losses(d["single"])
    assert sorted(losses) == list(range(1, STEPS + 1))  # every step once across the two runs
    diff = max_loss_diff(losses, one, range(1, STEPS + 1))
    print(f"ZeRO-3 on 2 hosts (frozen, resumed) vs 1 process: max loss diff {diff:.2e}")
    assert diff < LOSS_TOL


def test_two_host_checkpoint_resumes_on_one_node(runs):
    d = runs["dirs"]
    full, again = train_losses(d["ddp"]), train_losses(d["one_node"])
    assert sorted(again) == list(range(EVERY + 1, STEPS + 1))
    diff = max_loss_diff(full, again, range(EVERY + 1, STEPS + 1))
    wdiff = max_weight_diff(weights(d["ddp"]), weights(d["one_node"]))
    print(f"2-host checkpoint resumed on 1 process: max loss diff {diff:.2e}, weights {wdiff:.2e}")
    assert diff < LOSS_TOL and wdiff < 1e-5
    data = torch.load(d["one_node"] / "final" / "data_state_rank0.pt", weights_only=True)
    assert data["blocks_consumed"] == STEPS * 2 * 8  # the data went on where the 2-host run left it


def test_a_node_that_never_comes_is_named_within_a_minute(runs):
    for rank, missing in ((0, r"1/2 clients joined"), (1, r"\(host0, \d+\)")):
        code, seconds = runs["alone"][rank]
        log = runs["jobs"][f"alone{rank}"].log(rank)
        print(f"node {rank} started alone: exited with {code} after {seconds:.1f} s")
        assert code not in (0, -999) and seconds < LOST_WITHIN_S and re.search(missing, log), log[-3000:]


def test_no_route_to_the_head_is_one_line(hosts, tmp_path):
    """The trainer on a host without a route to MASTER_ADDR: one line naming it, exit 2 (no gloo retry log)."""
    env = node_env(GROUP_RANK="1", GROUP_WORLD_SIZE="2", RANK="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                   WORLD_SIZE="2", MASTER_ADDR="10.99.0.1", MASTER_PORT="29400", TORCHELASTIC_USE_AGENT_STORE="False")  # fmt: skip
    log = tmp_path / "noroute.log"
    proc = hosts.popen(
        1, [sys.executable, "-m", "mpnet_dist.train", "--batch-size", "2"], log, cwd=REPO, env=env
    )
    assert proc.wait(timeout=120) == 2
    lines = log.read_text().strip().splitlines()
    assert lines == [
        "mpnet-dist train: error: no route from this host to the main process address 10.99.0.1 (Network is "
        "unreachable): check --main_process_ip (the head node's address as the other nodes see it) and this "
        "host's network; set GLOO_SOCKET_IFNAME to choose the interface yourself"
    ], lines
    check = hosts.popen(1, [sys.executable, "-m", "mpnet_dist", "network", "10.99.0.1"], tmp_path / "n.log", cwd=REPO,
                        env=env)  # fmt: skip
    assert check.wait(timeout=60) == 2 and "10.99.0.1" in (tmp_path / "n.log").read_text()
