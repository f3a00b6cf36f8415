"""The nodes of a multi-node job: who they are, which interface reaches the others, and whether they are alive.

Under `accelerate launch` (torch elastic) every node's launcher meets the others in a TCP store on the head node
(MASTER_ADDR:MASTER_PORT) before it starts a training process. Before the process group exists, mpnet-dist uses
that store to
- exchange one entry per node (host, address, ranks): a node whose launcher came but whose training processes
  never started is named after --startup-timeout-s, instead of being waited for until the collective timeout;
- choose the network interface (network.py); the head, whose own name often resolves to a loopback address,
  takes the one that routes to another node;
- keep a heartbeat: each node's first process bumps a counter every --node-timeout-s / 6 seconds and every process
  watches the other nodes' counters. A node silent for --node-timeout-s (killed, frozen, unplugged) stops the
  survivors with a line naming it, whatever the collective timeout. A killed process's sockets are reset by its
  kernel, so gloo usually notices first (`explain` names the node then); the heartbeat catches what sends no
  reset: a frozen or unreachable host, or a transport that waits (NCCL).
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import timedelta

from mpnet_dist import network

DONE = 1 << 40  # added to a node's counter when it finishes cleanly: its silence after that is not a loss
EXIT_NODE_LOST = 1
# How gloo reports a peer that went away: "Read error [10.0.0.2]:4213: Connection reset by peer", etc.
_PEER_ERROR = re.compile(r"reset by peer|closed by peer|broken pipe|connection refused", re.IGNORECASE)
_PEER_ADDRESS = re.compile(r"\[([0-9A-Fa-f:.]+)\]:\d+")
_CURRENT: Cluster | None = None  # the job this process joined, for `explain`


class NodeLostError(RuntimeError):
    """A node of the job is gone (or never started training); the message names it."""


@dataclass
class Node:
    node: int
    host: str
    address: str
    ranks: list[int]

    def name(self) -> str:
        ranks = f"rank {self.ranks[0]}" if len(self.ranks) == 1 else f"ranks {self.ranks[0]}-{self.ranks[-1]}"
        return f"node {self.node} ({self.host}, {self.address}, {ranks})"


@dataclass
class Layout:
    """This process's place in a torch elastic launch, from the variables the elastic agent sets."""

    node: int
    nodes: int
    rank: int
    local_rank: int
    local_world: int
    master_addr: str
    master_port: int
    run_id: str
    agent_store: bool  # the launchers' store already serves MASTER_ADDR:MASTER_PORT

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Layout | None:
        env = os.environ if env is None else env
        try:
            return cls(
                node=int(env["GROUP_RANK"]),
                nodes=int(env["GROUP_WORLD_SIZE"]),
                rank=int(env["RANK"]),
                local_rank=int(env["LOCAL_RANK"]),
                local_world=int(env["LOCAL_WORLD_SIZE"]),
                master_addr=env["MASTER_ADDR"],
                master_port=int(env["MASTER_PORT"]),
                run_id=f"{env.get('TORCHELASTIC_RUN_ID', 'none')}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}",
                agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
            )
        except (KeyError, ValueError):
            return None  # not under torch elastic (a single process, mpirun, a notebook)

    def entry_key(self, node: int) -> str:
        return f"mpnet_dist/{self.run_id}/node/{node}"

    def beat_key(self, node: int) -> str:
        return f"mpnet_dist/{self.run_id}/beat/{node}"

    def connect(self, timeout_s: float):
        from torch.distributed import TCPStore

        return TCPStore(
            self.master_addr, self.master_port, is_master=False, timeout=timedelta(seconds=timeout_s),
            wait_for_workers=False,
        )  # fmt: skip


class Cluster:
    """The nodes of this job, and the heartbeat thread that watches them."""

    def __init__(self, layout: Layout, table: list[Node], notes: list[str]):
        self.layout, self.table, self.notes = layout, table, notes
        self._stop = threading.Event()
        self.timeout_s = 0.0

    def describe(self) -> str:
        return "nodes: " + "; ".join(node.name() for node in self.table)

    def watch(self, timeout_s: float) -> None:
        """Start the heartbeat (timeout_s <= 0: none).

        Two threads: one talks to the store, one judges. A store call to a frozen or unplugged head blocks with no
        timeout (measured: TCPStore's add() waited for good), so the judge must not be the thread that waits.
        """
        if timeout_s <= 0 or not self.layout.agent_store:
            return  # without the launchers' store there is nothing to beat into before the process group
        self.timeout_s = timeout_s
        now = time.monotonic()
        self._last_ok, self._last_error = now, ""
        self._heard = {
            n: (-1, now) for n in range(self.layout.nodes) if n != self.layout.node
        }  # value, since
        for target, name in ((self._beat, "mpnet-heartbeat"), (self._judge, "mpnet-node-watch")):
            threading.Thread(target=target, name=name, daemon=True).start()

    def leave(self) -> None:
        """Training finished cleanly: tell the others this node's silence from now on is not a loss."""
        self._stop.set()
        if self.layout.local_rank != 0 or not self.timeout_s:
            return

        def mark_done() -> None:
            try:
                self.layout.connect(min(self.timeout_s, 5)).add(self.layout.beat_key(self.layout.node), DONE)
            except Exception:  # noqa: BLE001 - best effort: the others then see the normal exit, not a loss
                pass

        # In a thread: a frozen head's store would block the call for good, and the exit must not hang on it.
        done = threading.Thread(target=mark_done, daemon=True)
        done.start()
        done.join(timeout=10)

    def node_at(self, address: str) -> Node | None:
        return next((node for node in self.table if node.address == address), None)

    def _interval(self) -> float:
        return max(self.timeout_s / 6, 0.1)

    def _beat(self) -> None:
        """Bump this node's counter (its first process only) and read the others'."""
        layout, others = self.layout, list(self._heard)
        keys = [layout.beat_key(n) for n in others]
        store = None
        while not self._stop.wait(self._interval()):
            try:
                store = store or layout.connect(self.timeout_s)
                if layout.local_rank == 0:
                    store.add(layout.beat_key(layout.node), 1)
                values = [int(v) for v in store.multi_get(keys)]
            except Exception as err:  # noqa: BLE001 - the head's store is gone: the judge decides when to give up
                store, self._last_error = None, f" ({_short(err)})"
                continue
            now = time.monotonic()
            self._last_ok = now
            for node, value in zip(others, values, strict=True):
                if value != self._heard[node][0]:
                    self._heard[node] = (value, now)

    def _judge(self) -> None:
        layout = self.layout
        last_tick = awake = time.monotonic()
        while not self._stop.wait(self._interval()):
            now = time.monotonic()
            if now - last_tick > 2 * self._interval():
                # This process itself was paused (starved of CPU, a GIL-holding call, a stopped VM): every counter
                # and store read here stood still for that long, so no other node gets the blame for it. Each gets
                # a full timeout again from now.
                awake = now
            last_tick = now
            if now - max(self._last_ok, awake) > self.timeout_s:
                self._lost(
                    f"the head node's store at {layout.master_addr}:{layout.master_port} has not answered for "
                    f"{now - self._last_ok:.0f} s{self._last_error}: {self.table[0].name()} is down or "
                    "unreachable, or this host lost its network"
                )
            # Only while the store answers does a still counter mean a silent node. The store lives on the head:
            # when the head stops, every counter stops with it, and the message above is the one that names it.
            answering = now - self._last_ok <= 2 * self._interval()
            for node, (value, since) in self._heard.items():
                if answering and value < DONE and now - max(since, awake) > self.timeout_s:
                    self._lost(
                        f"{self.table[node].name()} has not been heard from for {now - since:.0f} s "
                        f"(--node-timeout-s {self.timeout_s:g}): it died, froze or lost its network"
                    )

    def _lost(self, what: str) -> None:
        # The main thread may be blocked inside a collective that never returns: end the process from here.
        sys.stdout.flush()
        sys.stderr.write(f"mpnet-dist train: error: {what}. {_RESUME_HINT}\n")
        sys.stderr.flush()
        os._exit(EXIT_NODE_LOST)


_RESUME_HINT = (
    "Stopping this node; restart the job on all nodes with --resume to continue from the last checkpoint"
)


def join(
    startup_timeout_s: float, node_timeout_s: float, cuda: bool, env: dict[str, str] | None = None
) -> Cluster | None:
    """On a multi-node torch elastic launch: choose the interface, exchange node entries, start the heartbeat
    (node_timeout_s > 0). None elsewhere. `env` (default os.environ) supplies the launcher's variables and
    receives the interface variables."""
    global _CURRENT
    env = os.environ if env is None else env
    layout = Layout.from_env(env)
    if layout is None or layout.nodes < 2:
        return None
    # First the route: a host with no route to the head stops here, in one line.
    own, notes = _own_address(layout, cuda, env)
    store = layout.connect(startup_timeout_s) if layout.agent_store else None
    others = [n for n in range(layout.nodes) if n != layout.node]
    if own is None and store is not None:
        # The head's name resolved to loopback: take the interface on the route to another node.
        own, more = _address_toward(_read(store, layout, others, startup_timeout_s), cuda, env)
        notes += more
    own = own or network.resolve(layout.master_addr)
    if layout.local_rank == 0:
        for note in notes:
            print(f"[mpnet] {time.strftime('%H:%M:%S')} INFO node {layout.node}: {note}", flush=True)
    if store is None:
        table = [Node(layout.node, socket.gethostname(), own, _ranks(layout))]
        _CURRENT = cluster = Cluster(layout, table, notes)
        return cluster
    if layout.local_rank == 0:
        entry = Node(layout.node, socket.gethostname(), own, _ranks(layout))
        store.add(layout.beat_key(layout.node), 1)
        store.set(layout.entry_key(layout.node), json.dumps(asdict(entry)))
    # The local name, not the module's: a process that joins twice at once (the tests' two nodes in one process)
    # must get back its own cluster, not whichever the other join stored last.
    _CURRENT = cluster = Cluster(layout, _read(store, layout, range(layout.nodes), startup_timeout_s), notes)
    if layout.rank == 0:
        print(f"[mpnet] {time.strftime('%H:%M:%S')} INFO {cluster.describe()}", flush=True)
    cluster.watch(node_timeout_s)
    return cluster


def _ranks(layout: Layout) -> list[int]:
    first = layout.rank - layout.local_rank  # torch elastic numbers a node's ranks contiguously
    return list(range(first, first + layout.local_world))


def _own_address(layout: Layout, cuda: bool, env) -> tuple[str | None, list[str]]:
    """The address the other nodes reach this one at, and what was decided; None: ask the other nodes."""
    chosen = network.user_interface(env)
    if chosen:
        return network.address_of(chosen), [f"network interface {chosen} ({network.GLOO_VAR} set by you)"]
    master = network.resolve(layout.master_addr)
    if network.is_loopback(master):
        if layout.node == 0:
            if layout.agent_store:
                return None, []
            return master, [
                f"MASTER_ADDR {layout.master_addr} is a loopback address here: nodes on other hosts cannot reach this "
                f"one; pass the head's network address as --main_process_ip, or set {network.GLOO_VAR}"
            ]
        return master, [
            f"MASTER_ADDR {layout.master_addr} is a loopback address: all nodes must be on this host"
        ]
    return _use_route_to(master, f"MASTER_ADDR {layout.master_addr}", cuda, env)


def _use_route_to(address: str, what: str, cuda: bool, env) -> tuple[str, list[str]]:
    source = network.source_address(address)
    interface = network.interface_of(source)
    if interface is None:
        return source, [f"{source} routes to {what}, but no interface holds it; gloo keeps its default"]
    names = network.set_interface(interface, cuda, env)
    return source, [f"network interface {interface} ({source} routes to {what}; set {', '.join(names)})"]


def _address_toward(peers: list[Node], cuda: bool, env) -> tuple[str | None, list[str]]:
    remote = [p for p in peers if not network.is_loopback(p.address)]
    if not remote:
        return None, ["MASTER_ADDR and every node's address are loopback: all nodes are on this host"]
    return _use_route_to(remote[0].address, f"{remote[0].name()}; MASTER_ADDR is loopback here", cuda, env)


def _read(store, layout: Layout, nodes, timeout_s: float) -> list[Node]:
    keys = [layout.entry_key(n) for n in nodes]
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except Exception:  # noqa: BLE001 - torch raises DistStoreError (or RuntimeError) on a timeout
        missing = [n for n, key in zip(nodes, keys, strict=True) if not store.check([key])]
        raise NodeLostError(
            f"node(s) {', '.join(map(str, missing))} of {layout.nodes} did not start training within "
            f"--startup-timeout-s {timeout_s:g}: their launchers joined, but no training process reported in. "
            "Check those nodes' output (a crash at start, another installation, a dead host)"
        ) from None
    return [Node(**json.loads(value)) for value in store.multi_get(keys)]


def _short(err: BaseException) -> str:
    return str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__


def explain(err: BaseException) -> str | None:
    """A one-line account of a collective that failed because a peer went away; None for anything else."""
    text = str(err)
    if not isinstance(err, RuntimeError) or not _PEER_ERROR.search(text):
        return None
    match = _PEER_ADDRESS.search(text)
    address = match.group(1) if match else None
    node = _CURRENT.node_at(address) if (_CURRENT is not None and address) else None
    who = node.name() if node else (f"the process at {address}" if address else "a peer")
    return f"lost the connection to {who} ({_short(err)}): it died or its network failed. {_RESUME_HINT}"


def report_failure(err: BaseException) -> int | None:
    """For a host with no route, a node that never started or a lost peer: print one line naming it and return the
    exit code (2 for the network setup, 1 for a lost node). None for any other error."""
    if isinstance(err, network.NetworkError | NodeLostError):
        print(f"mpnet-dist train: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, network.NetworkError) else 1
    lost = explain(err)
    if lost is None:
        return None
    print(f"mpnet-dist train: error: {lost}", file=sys.stderr)
    # No Python teardown: with a peer gone, destroying the process group can stall (measured: 7 s under load
    # between this line and the exit), and the survivors must go fast.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_NODE_LOST)
