"""Pod networking: a network namespace per pod on one bridge, pod IPs, and Service names.

The bridge lives in a namespace of its own (the "node"), so nothing of the box touches
the host's network. Service names resolve through each pod's hosts file, kept in
/etc/netns/<ns>/hosts (what `ip netns exec` binds over /etc/hosts) and bound over the
container's /etc/hosts: a ClusterIP Service resolves to its ready endpoints, a headless
one to every ready pod, with `<pod>.<service>` names for a StatefulSet's pods.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import shutil
import subprocess
import threading
from pathlib import Path

NETNS_ETC = Path("/etc/netns")
BRIDGE = "br0"
DOMAIN = "svc.cluster.local"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Network:
    def __init__(self, prefix: str, cidr: str = "10.244.0.0/16"):
        for tool in ("ip", "nft", "unshare", "chroot"):
            if not shutil.which(tool):
                raise RuntimeError(f"{tool} is required (apt-get install iproute2 nftables util-linux coreutils)")
        self.prefix = prefix
        self.net = ipaddress.ip_network(cidr)
        self.node_ns = f"{prefix}-node"
        self.node_ip = str(self.net.network_address + 1)
        self._hosts = itertools.islice(self.net.hosts(), 1, None)
        self._links = itertools.count()
        self._lock = threading.Lock()
        self.namespaces: dict[str, str] = {}  # netns -> pod IP
        ip("netns", "add", self.node_ns)
        ip("-n", self.node_ns, "link", "set", "lo", "up")
        ip("-n", self.node_ns, "link", "add", BRIDGE, "type", "bridge")
        ip("-n", self.node_ns, "addr", "add", f"{self.node_ip}/{self.net.prefixlen}", "dev", BRIDGE)
        ip("-n", self.node_ns, "link", "set", BRIDGE, "up")

    def add(self, netns: str) -> str:
        """A namespace on the bridge; returns its IP."""
        with self._lock:
            address = str(next(self._hosts))
            veth = f"v{self.prefix[-4:]}{next(self._links)}"
        ip("netns", "add", netns)
        ip("-n", self.node_ns, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        ip("-n", self.node_ns, "link", "set", veth, "master", BRIDGE, "up")
        ip("-n", netns, "addr", "add", f"{address}/{self.net.prefixlen}", "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
        ip("-n", netns, "link", "set", "lo", "up")
        (NETNS_ETC / netns).mkdir(parents=True, exist_ok=True)
        # No cluster DNS: names come from the hosts file, anything else fails at once.
        (NETNS_ETC / netns / "resolv.conf").write_text("")
        self.namespaces[netns] = address
        return address

    def remove(self, netns: str) -> None:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        shutil.rmtree(NETNS_ETC / netns, ignore_errors=True)
        self.namespaces.pop(netns, None)

    def hosts_file(self, netns: str) -> Path:
        return NETNS_ETC / netns / "hosts"

    def write_hosts(self, netns: str, own: list[str], records: dict[str, list[str]]) -> None:
        """Rewritten in place (same inode), so the file bound into a running container changes too."""
        if netns not in self.namespaces:
            return  # removed meanwhile (a pod deleted while the names were written)
        lines = ["127.0.0.1 localhost", "::1 localhost", f"{self.namespaces[netns]} {' '.join(own)}"]
        lines += [f"{address} {name}" for name, addresses in sorted(records.items()) for address in addresses]
        path = self.hosts_file(netns)
        with open(path, "a+") as fh:
            fh.seek(0)
            fh.truncate()
            fh.write("\n".join(lines) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def close(self) -> None:
        for netns in list(self.namespaces):
            self.remove(netns)
        subprocess.run(["ip", "netns", "del", self.node_ns], capture_output=True)


def service_names(service: str, namespace: str, client_namespace: str) -> list[str]:
    """The names a pod in client_namespace may use for a Service (its search path included)."""
    names = [f"{service}.{namespace}", f"{service}.{namespace}.svc", f"{service}.{namespace}.{DOMAIN}"]
    return ([service] if namespace == client_namespace else []) + names
