"""Node table, startup exchange and heartbeat against a real TCP store in this process (one "node" per thread).

The same machinery on two real hosts, with real launchers, is in tests/test_multinode.py.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
from torch.distributed import TCPStore

from mpnet_dist import nodes
from mpnet_dist.nodes import Cluster, Layout, Node, NodeLostError

TIMEOUT_S = 1.5  # heartbeat timeout for these tests (beats every 0.25 s)


def _env(node: int, port: int, **extra: str) -> dict[str, str]:
    return {"GROUP_RANK": str(node), "GROUP_WORLD_SIZE": "2", "RANK": str(node), "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "TORCHELASTIC_RUN_ID": "test", "TORCHELASTIC_USE_AGENT_STORE": "True", **extra}  # fmt: skip


@pytest.fixture
def store():
    """The launchers' store, as the head node's agent hosts it."""
    return TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))


class Recorder(Cluster):
    """Records a loss and ends its heartbeat instead of ending the process."""

    lost: list[str]

    def _lost(self, what: str) -> None:
        self.lost = [*getattr(self, "lost", []), what]
        self._stop.set()


def _join_both(port: int, **extra: str) -> list[Cluster]:
    envs = [_env(n, port, **extra) for n in (0, 1)]
    results: list = [None, None]

    def join(n: int) -> None:
        results[n] = nodes.join(5, 0, cuda=False, env=envs[n])

    threads = [threading.Thread(target=join, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert all(results), results
    assert [c.layout.node for c in results] == [0, 1]  # each join returned its own node's cluster
    return results + envs


def test_layout_comes_from_the_elastic_agent_variables():
    layout = Layout.from_env(_env(1, 29500))
    assert (layout.node, layout.nodes, layout.rank, layout.agent_store) == (1, 2, 1, True)
    assert Layout.from_env({"RANK": "0", "WORLD_SIZE": "1"}) is None  # not under torch elastic


def test_nodes_exchange_entries_and_agree_on_loopback(store):
    c0, c1, env0, env1 = _join_both(store.port)
    assert [n.node for n in c0.table] == [n.node for n in c1.table] == [0, 1]
    assert {n.address for n in c0.table} == {"127.0.0.1"}
    assert "all nodes are on this host" in " ".join(c0.notes)  # the head asked the other node
    assert "GLOO_SOCKET_IFNAME" not in env0 and "GLOO_SOCKET_IFNAME" not in env1  # loopback: gloo's default
    c0, c1, env0, _ = _join_both(store.port, TORCHELASTIC_RUN_ID="user", GLOO_SOCKET_IFNAME="lo")
    assert (
        c0.notes == ["network interface lo (GLOO_SOCKET_IFNAME set by you)"]
        and env0["GLOO_SOCKET_IFNAME"] == "lo"
    )


def test_a_node_that_never_reports_in_is_named(store):
    with pytest.raises(
        NodeLostError, match=r"node\(s\) 1 of 2 did not start training within --startup-timeout-s 1"
    ):
        nodes.join(1, 0, cuda=False, env=_env(0, store.port))


def _watched(port: int) -> tuple[Recorder, Recorder]:
    c0, c1, _, _ = _join_both(port, TORCHELASTIC_RUN_ID=f"hb{time.monotonic_ns()}")
    recorders = []
    for c in (c0, c1):
        r = Recorder(c.layout, c.table, c.notes)
        r.lost = []
        r.watch(TIMEOUT_S)
        recorders.append(r)
    return recorders[0], recorders[1]


def _wait(predicate, seconds: float) -> float:
    start = time.monotonic()
    while not predicate() and time.monotonic() - start < seconds:
        time.sleep(0.02)
    return time.monotonic() - start


def test_a_silent_node_is_named_after_the_timeout(store):
    r0, r1 = _watched(store.port)
    time.sleep(3 * TIMEOUT_S)
    assert r0.lost == [] and r1.lost == []  # beating nodes are not lost, however long
    r1._stop.set()  # node 1 goes silent
    _wait(lambda: r0.lost, 20 * TIMEOUT_S)
    assert len(r0.lost) == 1 and r0.lost[0].startswith("node 1 (") and "--node-timeout-s 1.5" in r0.lost[0]


def test_a_node_that_finished_is_not_lost(store):
    r0, r1 = _watched(store.port)
    r1.leave()
    time.sleep(3 * TIMEOUT_S)
    assert r0.lost == []
    r0._stop.set()


def test_a_paused_process_blames_no_other_node(store):
    """This process stops running for longer than the timeout (here: the main thread holds the GIL, as a long
    pickle does; on a cluster also a starved CPU or a stopped VM). On waking, its judge must not read its own
    pause as another node's silence or as the head's store not answering."""
    r0, r1 = _watched(store.port)
    time.sleep(2 * TIMEOUT_S)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(60)  # no other thread of this process runs until the loop below gives the GIL up
    try:
        end = time.monotonic() + 2 * TIMEOUT_S
        while time.monotonic() < end:
            pass
    finally:
        sys.setswitchinterval(switch)
    time.sleep(3 * TIMEOUT_S)
    assert r0.lost == [] and r1.lost == []
    r1._stop.set()  # the pause did not blind the judge: a node that then goes silent is still named
    _wait(lambda: r0.lost, 20 * TIMEOUT_S)
    assert len(r0.lost) == 1 and r0.lost[0].startswith("node 1 ("), r0.lost


def test_a_frozen_head_store_is_named(tmp_path):
    """The head's launcher (which hosts the store) stops answering: calls to it block, the judge still decides."""
    server = subprocess.Popen([sys.executable, "-c", _SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        r0, r1 = _watched(port)
        time.sleep(2 * TIMEOUT_S)
        assert r0.lost == [] and r1.lost == []
        server.send_signal(signal.SIGSTOP)
        _wait(lambda: r0.lost and r1.lost, 20 * TIMEOUT_S)
        for lost in (r0.lost, r1.lost):
            assert lost and f"head node's store at 127.0.0.1:{port} has not answered" in lost[0], lost
            assert "node 0 (" in lost[0]
    finally:
        server.kill()
        server.wait()


_SERVER = """
import time
from torch.distributed import TCPStore
store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
print(store.port, flush=True)
time.sleep(300)
"""


def test_a_reset_connection_names_the_node():
    layout = Layout.from_env(_env(0, 1))
    nodes._CURRENT = Cluster(
        layout, [Node(0, "h0", "10.0.0.1", [0, 1]), Node(1, "h1", "10.0.0.2", [2, 3])], []
    )
    try:
        err = RuntimeError(
            "[pair.cc:537] Read error [10.0.0.2]:36509: Connection reset by peer. This is typically"
        )
        assert nodes.explain(err).startswith("lost the connection to node 1 (h1, 10.0.0.2, ranks 2-3) (")
        unknown = RuntimeError("Connection closed by peer [10.9.9.9]:1234")
        assert "the process at 10.9.9.9" in nodes.explain(unknown)
        assert nodes.explain(RuntimeError("CUDA out of memory")) is None
        assert nodes.explain(ValueError("Connection reset by peer")) is None
    finally:
        nodes._CURRENT = None
