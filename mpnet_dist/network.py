"""Which network interface the process group uses between nodes.

Unless GLOO_SOCKET_IFNAME (NCCL_SOCKET_IFNAME for NCCL) names an interface, gloo binds to the address this host's
name resolves to. On many hosts that is 127.0.0.1, or 127.0.1.1 on a stock Debian install, which no other node
can reach: one node fails with "Gloo connectFullMesh failed ... Connection refused" while the others wait for
the collective timeout. The interface to use is the one whose address routes to the main process (MASTER_ADDR);
the kernel's routing table answers that without sending a packet (a UDP socket's connect + getsockname).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys

import psutil

from mpnet_dist.command import Parser, run_command

GLOO_VAR, NCCL_VAR = "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"


class NetworkError(RuntimeError):
    """This host cannot reach the main process: the message names the address and the fix."""


def interface_variables(cuda: bool) -> tuple[str, ...]:
    """The variables that choose an interface: gloo everywhere, NCCL's too on GPU hosts."""
    return (GLOO_VAR, NCCL_VAR) if cuda else (GLOO_VAR,)


def is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address.split("%")[0]).is_loopback


def resolve(host: str) -> str:
    """MASTER_ADDR as an IP address (it is often a host name, e.g. from `scontrol show hostnames`)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError) as err:
        raise NetworkError(
            f"the main process address {host!r} (--main_process_ip / MASTER_ADDR) does not resolve on this host "
            f"({err}): pass the head node's IP address, or fix the name in DNS or /etc/hosts"
        ) from None
    ipv4 = [info for info in infos if info[0] == socket.AF_INET]
    return (ipv4 or infos)[0][4][0]


def source_address(address: str) -> str:
    """This host's address on the route to `address` (a UDP connect only consults the routing table)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((address, 9))  # any port: nothing is sent
        except OSError as err:
            raise NetworkError(
                f"no route from this host to the main process address {address} ({err.strerror}): check "
                "--main_process_ip (the head node's address as the other nodes see it) and this host's network; "
                f"set {GLOO_VAR} to choose the interface yourself"
            ) from None
        return sock.getsockname()[0]


def interface_addresses() -> dict[str, list[str]]:
    """Interface name -> its IPv4/IPv6 addresses (scope suffixes dropped)."""
    families = (socket.AF_INET, socket.AF_INET6)
    return {
        name: [a.address.split("%")[0] for a in addrs if a.family in families]
        for name, addrs in psutil.net_if_addrs().items()
    }


def interface_of(address: str) -> str | None:
    for name, addresses in interface_addresses().items():
        if address in addresses:
            return name
    return None


def address_of(interface: str) -> str:
    """The first address of a named interface (IPv4 first); NetworkError naming the known ones if absent."""
    known = interface_addresses()
    addresses = sorted(known.get(interface, []), key=lambda a: ":" in a)
    if not addresses:
        raise NetworkError(
            f"{GLOO_VAR}={interface}: this host has no interface of that name with an address "
            f"(it has: {', '.join(sorted(n for n, a in known.items() if a))}); unset it to let mpnet-dist choose"
        )
    return addresses[0]


def user_interface(environ: dict[str, str] | None = None) -> str | None:
    """The interface GLOO_SOCKET_IFNAME names (its first one: gloo accepts a comma-separated list), if set."""
    value = (os.environ if environ is None else environ).get(GLOO_VAR, "")
    return value.split(",")[0].strip() or None


def set_interface(interface: str, cuda: bool, environ: dict[str, str] | None = None) -> list[str]:
    """Export the interface to every variable the user left unset; return the names set."""
    environ = os.environ if environ is None else environ
    chosen = [var for var in interface_variables(cuda) if not environ.get(var)]
    for var in chosen:
        environ[var] = interface
    return chosen


def main(argv: list[str] | None = None) -> int:
    """`mpnet-dist network HEAD`: the interface this host would use to reach HEAD; one line and exit 2 if none."""
    argv = sys.argv[1:] if argv is None else argv
    return run_command("mpnet-dist network", _show_route, argv)


def _show_route(argv: list[str]) -> int:
    parser = Parser(
        prog="mpnet-dist network",
        description="Show the network interface this host uses to reach the head node of a multi-node job "
        "(what training sets GLOO_SOCKET_IFNAME to); exit 2 with one line when there is no route.",
    )
    parser.add_argument("head", help="the head node's address or name (--main_process_ip)")
    args = parser.parse_args(argv)
    try:
        address = resolve(args.head)
        if is_loopback(address):
            print(f"{args.head} is {address}, a loopback address here: on the head node itself training takes "
                  "the interface on the route to the other nodes")  # fmt: skip
            return 0
        source = source_address(address)
    except NetworkError as err:
        print(f"mpnet-dist network: error: {err}", file=sys.stderr)
        return 2
    user = user_interface()
    chosen = f"{GLOO_VAR}={user} (set by you)" if user else (interface_of(source) or "gloo's default")
    print(f"{args.head} ({address}) is reached from {source}: interface {chosen}")
    return 0
