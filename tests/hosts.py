"""Hosts of one test: network namespaces on a bridge of their own, made with iproute2.

Each host is a namespace with its own address and hostname, joined by a veth pair to a
bridge in the machine's namespace that carries the address the test's servers listen on
(`gateway`). A host has no default route: it reaches the bridge's subnet and nothing else,
so the only traffic these hosts make goes to the test's own servers. Cutting a host's link
takes its veth down, as a pulled cable does: its connections neither close nor fail, their
packets are dropped until the link is back.

Names carry a tag unique per run (interface names are at most 15 characters), and
`close()` removes everything, also after a failed `create()`. Needs root (the tests run as
root); a missing `ip` fails the test.
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

COMMAND_TIMEOUT = 30


def _ip(*args: str, check: bool = True) -> str:
    exe = shutil.which("ip")
    if exe is None:
        pytest.fail("iproute2's `ip` is not installed; the several-hosts tests need it")
    done = subprocess.run(
        [exe, *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def _tc(namespace: str, *args: str, check: bool = True) -> None:
    if shutil.which("tc") is None:
        pytest.fail("iproute2's `tc` is not installed; the several-hosts tests need it")
    _ip("netns", "exec", namespace, "tc", *args, check=check)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.0.0.0/8 that no route of this machine covers or overlaps."""
    taken = []
    for line in _ip("-4", "route", "show", "table", "all").splitlines():
        dest = line.split()[0] if line.split() else ""
        if dest and dest[0].isdigit():
            with contextlib.suppress(ValueError):
                taken.append(ipaddress.ip_network(dest, strict=False))
    for _ in range(100):
        subnet = ipaddress.IPv4Network(
            f"10.{random.randrange(200, 255)}.{random.randrange(1, 255)}.0/24"
        )
        if not any(subnet.overlaps(other) for other in taken):
            return subnet
    raise RuntimeError("no free 10.x.y.0/24 subnet for the test's hosts")


@dataclass
class Hosts:
    """`count` hosts (network namespaces) on one bridge; `create()`, `cut(i)`, `close()`."""

    count: int
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:5])
    subnet: ipaddress.IPv4Network = field(default_factory=_free_subnet)
    _made: list[tuple[str, str]] = field(default_factory=list)  # (kind, name) to remove

    @property
    def bridge(self) -> str:
        return f"txb{self.tag}"

    @property
    def gateway(self) -> str:
        """The bridge's address: where the hosts reach the test's servers."""
        return str(self.subnet.network_address + 1)

    def name(self, i: int) -> str:
        """Host `i`'s namespace, also its hostname."""
        return f"txh-{self.tag}-{i}"

    def address(self, i: int) -> str:
        return str(self.subnet.network_address + 10 + i)

    def _veth(self, i: int) -> str:
        return f"txv{self.tag}{i}"  # the bridge's end; the host's end is `txp...`

    def _peer(self, i: int) -> str:
        return f"txp{self.tag}{i}"

    def create(self) -> Hosts:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            self._made.append(("link", self.bridge))
            _ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i in range(self.count):
                self._add_host(i)
        except BaseException:
            self.close()
            raise
        return self

    def _add_host(self, i: int) -> None:
        ns, veth, peer = self.name(i), self._veth(i), self._peer(i)
        _ip("netns", "add", ns)
        self._made.append(("netns", ns))
        _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        self._made.append(("link", veth))  # removing one end removes the pair
        _ip("link", "set", peer, "netns", ns)
        _ip("link", "set", veth, "master", self.bridge, "up")
        _ip("-n", ns, "addr", "add", f"{self.address(i)}/{self.subnet.prefixlen}", "dev", peer)
        _ip("-n", ns, "link", "set", peer, "up")
        _ip("-n", ns, "link", "set", "lo", "up")

    def prefix(self, i: int) -> tuple[str, ...]:
        """The command prefix that runs a program on host `i`, under its own hostname.

        `ip netns exec`, `unshare --uts` and `sh -c 'exec'` each exec the next, so the
        program keeps the pid the test started.
        """
        return (
            "ip", "netns", "exec", self.name(i), "unshare", "--uts", "--",
            "sh", "-c", 'hostname "$0" && exec "$@"', self.name(i),
        )  # fmt: skip

    def run(self, i: int, *argv: str) -> str:
        """Run `argv` on host `i` and return its output (it must succeed)."""
        done = subprocess.run(
            [*self.prefix(i), *argv], capture_output=True, text=True,
            timeout=COMMAND_TIMEOUT, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{argv} on {self.name(i)} failed: {done.stderr.strip()}")
        return done.stdout

    def drop_to_port(self, i: int, port: int) -> None:
        """Black-hole what host `i` sends to TCP `port` (a partial partition), with tc.

        This kernel has neither tc's drop action nor the prio and netem qdiscs, so the
        packets go to an HTB class limited to 8 bits/s: as good as dropped (one ACK a minute
        at most), while the rest of the host's traffic flows.
        """
        dev, ns = self._peer(i), self.name(i)
        _tc(ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1")
        _tc(ns, "class", "add", "dev", dev, "parent", "1:", "classid", "1:1",
            "htb", "rate", "10gbit")  # fmt: skip
        _tc(ns, "class", "add", "dev", dev, "parent", "1:", "classid", "1:2",
            "htb", "rate", "8bit", "ceil", "8bit", "burst", "1", "cburst", "1")  # fmt: skip
        _tc(ns, "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1",
            "u32", "match", "ip", "dport", str(port), "0xffff", "flowid", "1:2")  # fmt: skip

    def cut(self, i: int) -> None:
        """Take host `i`'s link down: its packets are dropped, its connections hang."""
        _ip("link", "set", self._veth(i), "down")

    def restore(self, i: int) -> None:
        """Undo `cut` and `drop_to_port`."""
        _tc(self.name(i), "qdisc", "del", "dev", self._peer(i), "root", check=False)
        _ip("link", "set", self._veth(i), "up")
        # Addresses the host failed to resolve while cut would answer "no route" a while.
        _ip("-n", self.name(i), "neigh", "flush", "all", check=False)

    def close(self) -> None:
        """Remove every namespace, veth and the bridge this made (in reverse); never raises."""
        while self._made:
            kind, name = self._made.pop()
            if kind == "netns":
                _ip("netns", "delete", name, check=False)
            else:
                _ip("link", "delete", name, check=False)

    def leftovers(self) -> list[str]:
        """What of this run's still exists (empty after `close()`)."""
        links = [line for line in _ip("-br", "link").splitlines() if self.tag in line]
        spaces = [line for line in _ip("netns", "list").splitlines() if self.tag in line]
        return links + spaces


@contextlib.contextmanager
def made_hosts(count: int) -> Iterator[Hosts]:
    """`count` hosts, removed at the end whatever happened."""
    hosts = Hosts(count).create()
    try:
        yield hosts
    finally:
        hosts.close()
