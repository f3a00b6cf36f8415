"""Interface choice helpers (the two-host behaviour is in tests/test_multinode.py)."""

from __future__ import annotations

import sys

import pytest

from mpnet_dist import network
from mpnet_dist.network import NetworkError

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="interface names are Linux's")


def test_resolve_names_and_refuses_what_does_not_resolve():
    assert network.resolve("127.0.0.1") == "127.0.0.1"
    assert network.is_loopback(network.resolve("localhost"))
    with pytest.raises(
        NetworkError, match=r"'no-such-host\.invalid' \(--main_process_ip / MASTER_ADDR\) does not"
    ):
        network.resolve("no-such-host.invalid")


@linux_only
def test_the_route_to_loopback_is_on_lo():
    assert network.source_address("127.0.0.1") == "127.0.0.1"
    assert network.interface_of("127.0.0.1") == "lo"
    assert network.address_of("lo") == "127.0.0.1"


def test_a_named_interface_that_does_not_exist_is_refused_with_the_ones_that_do():
    with pytest.raises(
        NetworkError, match=r"GLOO_SOCKET_IFNAME=nosuch0: this host has no interface .*it has: .*lo"
    ):
        network.address_of("nosuch0")


def test_user_variables_win():
    assert network.user_interface({"GLOO_SOCKET_IFNAME": "eth1,eth2"}) == "eth1"  # gloo takes a list
    assert network.user_interface({"GLOO_SOCKET_IFNAME": ""}) is None
    assert network.user_interface({}) is None
    env = {"NCCL_SOCKET_IFNAME": "ib0"}
    assert network.set_interface("eth0", cuda=True, environ=env) == ["GLOO_SOCKET_IFNAME"]
    assert env == {"NCCL_SOCKET_IFNAME": "ib0", "GLOO_SOCKET_IFNAME": "eth0"}
    env = {}
    assert network.set_interface("eth0", cuda=False, environ=env) == ["GLOO_SOCKET_IFNAME"]  # no NCCL on CPU


def test_network_command(capsys):
    assert network.main(["127.0.0.1"]) == 0
    assert "loopback" in capsys.readouterr().out
    assert network.main(["no-such-host.invalid"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mpnet-dist network: error: the main process address")
