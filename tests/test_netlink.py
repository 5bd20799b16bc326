"""The netlink batcher: a batch of any size goes through, every request acknowledged."""

from __future__ import annotations

import uuid

import pytest
from conftest import ip_json, needs_root

from netsim.kernel import netns as nsmod


@pytest.fixture
def scratch():
    name = f"nltest-{uuid.uuid4().hex[:8]}"  # not netsim.*: no cluster's gc may take it
    nsmod.create(name)
    try:
        yield name
    finally:
        nsmod.remove(name)


@needs_root
def test_a_batch_far_larger_than_the_socket_buffer_is_sent_and_acknowledged(scratch):
    """20 000 routes in one commit: their acks alone (one skb each) are many times the
    default receive buffer, so they must be read as the batch goes out."""
    from netsim.kernel.netlink import IFINDEX, Rtnl

    with Rtnl(scratch) as rt:
        rt.link_up(IFINDEX.LO, "lo")
        for i in range(20000):
            rt.route(f"10.{i >> 8 & 255}.{i & 255}.0/24", IFINDEX.LO)
        assert rt.commit() == 20001
    routes = ip_json(scratch, "route", "show", "table", "main")
    assert len(routes) == 20000 and routes[0]["dev"] == "lo"


@needs_root
def test_the_first_refusal_of_a_large_batch_is_named(scratch):
    from netsim.errors import KernelError
    from netsim.kernel.netlink import IFINDEX, Rtnl

    with Rtnl(scratch) as rt:
        rt.link_up(IFINDEX.LO, "lo")
        for i in range(3000):
            rt.route(f"10.0.{i >> 8}.{i & 255}/32", IFINDEX.LO)
        rt.route("10.0.0.5/32", IFINDEX.LO)  # a duplicate, after thousands of good ones
        with pytest.raises(
            KernelError,
            match=r"add route 10.0.0.5/32 in netns nltest-.*"
            r"File exists \(errno 17\)",
        ):
            rt.commit()
