"""Separate test hosts on one machine: Linux network namespaces joined by a bridge.

Each host is a network namespace with its own loopback and one interface, eth0, on a private subnet that only the
bridge (in a namespace of its own) joins: no shared loopback, no route anywhere else. Processes started on a host
also get their own host name (a UTS namespace), and /etc/hosts as a stock Debian host has it: its own name on
127.0.1.1 (the trap that makes gloo bind to a loopback address), the other hosts' names on their addresses
(`ip netns exec` mounts /etc/netns/NAME/hosts over /etc/hosts). Everything created is removed by `close`, which the
fixture calls even when a test fails; processes started there are killed first.
Needs root and iproute2; `unavailable()` says why not, for the skip reason.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psutil

SUBNET = "10.213.7"  # private; reachable only inside these namespaces
NETNS_ETC = Path("/etc/netns")


@dataclass
class Host:
    index: int
    netns: str
    name: str  # its host name
    address: str  # eth0's address
    interface: str = "eth0"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "separate test hosts need root (ip netns add); run the multi-node tests as root (CI does)"
    if shutil.which("ip") is None:
        return "separate test hosts need iproute2's `ip` (apt-get install iproute2)"
    probe = f"mpnprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace here (ip netns add: {made.stderr.strip()})"
    _ip("netns", "del", probe, check=False)
    return None


class Hosts:
    """`count` hosts named host0, host1, ... on SUBNET.0/24 (host i at .i+1), joined by a bridge."""

    def __init__(self, count: int):
        tag = f"mpn{os.getpid()}"
        self.switch = f"{tag}sw"
        self.hosts = [Host(i, f"{tag}h{i}", f"host{i}", f"{SUBNET}.{i + 1}") for i in range(count)]
        self.procs: list[subprocess.Popen] = []
        self._uts = shutil.which("unshare") is not None

    def __getitem__(self, index: int) -> Host:
        return self.hosts[index]

    def up(self) -> Hosts:
        _remove_stale()
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for host in self.hosts:
            _ip("netns", "add", host.netns)
            port = f"port{host.index}"
            _ip("link", "add", host.interface, "netns", host.netns, "type", "veth", "peer", "name", port,
                "netns", self.switch)  # fmt: skip
            _ip("-n", self.switch, "link", "set", port, "master", "br0")
            _ip("-n", self.switch, "link", "set", port, "up")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", host.interface)
            for link in ("lo", host.interface):
                _ip("-n", host.netns, "link", "set", link, "up")
            etc = NETNS_ETC / host.netns
            etc.mkdir(parents=True, exist_ok=True)
            others = "".join(f"{h.address} {h.name}\n" for h in self.hosts if h is not host)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {host.name}\n{others}")
        return self

    def popen(self, index: int, argv: list[str], log: Path, **kwargs) -> subprocess.Popen:
        """Run argv on host `index` (in its namespace, under its host name), output to `log`."""
        host = self.hosts[index]
        prefix = ["ip", "netns", "exec", host.netns]
        if self._uts:
            prefix += ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', host.name]
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(prefix + argv, stdout=out, stderr=subprocess.STDOUT, **kwargs)
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        """Signal a process started here and everything under it (torch elastic puts workers in new sessions)."""
        try:
            root = psutil.Process(proc.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in tree:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    def unplug(self, index: int) -> None:
        """Take host `index` off the network (its cable pulled): no reset reaches the others."""
        _ip("-n", self.hosts[index].netns, "link", "set", self.hosts[index].interface, "down")

    def plug(self, index: int) -> None:
        _ip("-n", self.hosts[index].netns, "link", "set", self.hosts[index].interface, "up")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.kill(proc, signal.SIGCONT)
                self.kill(proc)
                proc.wait(timeout=30)
        for netns in [h.netns for h in self.hosts] + [self.switch]:
            _ip("netns", "del", netns, check=False)
            shutil.rmtree(NETNS_ETC / netns, ignore_errors=True)


def _remove_stale() -> None:
    """Namespaces left by a test run that was killed before its finalizer ran (named after its dead pid)."""
    listed = _ip("netns", "list", check=False).stdout.split()
    for name in {n for n in listed if re.fullmatch(r"mpn\d+(sw|h\d+)", n)}:
        if not psutil.pid_exists(int(re.match(r"mpn(\d+)", name).group(1))):
            _ip("netns", "del", name, check=False)
            shutil.rmtree(NETNS_ETC / name, ignore_errors=True)
