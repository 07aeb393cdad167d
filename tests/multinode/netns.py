"""Two "hosts" on one machine: two network namespaces joined by a veth pair, each with its own address.

Names and the private test subnet are derived from this process's id so that concurrent test runs do
not collide; the namespaces (and with them the veth pair) are always deleted in a ``finally``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
from collections.abc import Iterator

__all__ = ["Host", "netns_unavailable", "two_hosts"]


@dataclasses.dataclass(frozen=True)
class Host:
    namespace: str
    interface: str
    address: str

    def prefix(self) -> list[str]:
        """Command prefix that runs a program inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


def netns_unavailable() -> str | None:
    """Why two namespaces cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "the `ip` tool (iproute2) is missing"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    return None


@contextlib.contextmanager
def two_hosts() -> Iterator[tuple[Host, Host]]:
    tag = f"{os.getpid() % 100000}"
    subnet = f"10.213.{os.getpid() % 250}"
    a = Host(f"soaa{tag}a", f"sv{tag}a", f"{subnet}.1")
    b = Host(f"soaa{tag}b", f"sv{tag}b", f"{subnet}.2")
    created: list[str] = []
    try:
        for h in (a, b):
            _ip("netns", "add", h.namespace)
            created.append(h.namespace)
        _ip("link", "add", a.interface, "type", "veth", "peer", "name", b.interface)
        for h in (a, b):
            _ip("link", "set", h.interface, "netns", h.namespace)
            _ip("-n", h.namespace, "addr", "add", f"{h.address}/24", "dev", h.interface)
            _ip("-n", h.namespace, "link", "set", h.interface, "up")
            _ip("-n", h.namespace, "link", "set", "lo", "up")
        yield a, b
    finally:
        for ns in created:  # deleting a namespace destroys the veth end inside it, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        subprocess.run(["ip", "link", "del", a.interface], capture_output=True, timeout=20)  # if never moved
