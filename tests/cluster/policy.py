"""NetworkPolicies as nftables rules, in each pod's own network namespace.

A pod selected by a policy of a direction drops what no policy of that direction
allows: default deny, then the allowed edges (peers: pods, namespaces, IP blocks;
ports with protocol and endPort). Replies to an allowed connection pass (conntrack),
and so do kubelet's probes from the node, as most CNIs let the node reach its pods.
An edge the code needs and no policy allows stays closed: the test that needs it fails.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import subprocess

from .manifests import selects


@dataclasses.dataclass
class Endpoint:
    """What a policy needs to know of a pod."""

    name: str
    namespace: str
    labels: dict
    ip: str
    ports: dict[str, int]  # named container ports


def _peers(
    peer_list: list[dict] | None, policy_ns: str, pods: list[Endpoint], namespaces: dict[str, dict]
) -> list[str] | None:
    """Source or destination addresses; None means any."""
    if not peer_list:
        return None
    out: list[str] = []
    for peer in peer_list:
        if "ipBlock" in peer:
            block = peer["ipBlock"]
            cidr = ipaddress.ip_network(block["cidr"])
            if cidr.version != 4:
                continue
            excepted = [ipaddress.ip_network(e) for e in block.get("except") or []]
            out += [str(n) for n in _subtract(cidr, excepted)]
            continue
        if "namespaceSelector" in peer:
            in_ns = {n for n, labels in namespaces.items() if selects(peer["namespaceSelector"], labels)}
        else:
            in_ns = {policy_ns}
        chosen = peer.get("podSelector")
        out += [p.ip for p in pods if p.namespace in in_ns and selects(chosen, p.labels)]
    return out


def _subtract(net, excepted):
    nets = [net]
    for e in excepted:
        nets = [piece for n in nets for piece in (n.address_exclude(e) if e.subnet_of(n) else [n])]
    return nets


def _ports(ports: list[dict] | None, named: dict[str, int]) -> list[str]:
    """nft match expressions; [""] means any port."""
    if not ports:
        return [""]
    out = []
    for p in ports:
        proto = p.get("protocol", "TCP").lower()
        port = p.get("port")
        if port is None:
            out.append(f"meta l4proto {proto}")
            continue
        if isinstance(port, str):
            if port not in named:
                raise RuntimeError(f"named port {port} cannot be resolved in the box")
            port = named[port]
        end = p.get("endPort")
        out.append(f"{proto} dport {port}-{end}" if end else f"{proto} dport {port}")
    return out


def ruleset(
    pod: Endpoint, policies: list[dict], pods: list[Endpoint], namespaces: dict[str, dict], node_ip: str
) -> str:
    """The nft script that makes pod's namespace enforce every policy that selects it."""
    chains = {"Ingress": ["iif lo accept", "ct state established,related accept", f"ip saddr {node_ip} accept"]}
    chains["Egress"] = ["oif lo accept", "ct state established,related accept"]
    selected = {"Ingress": False, "Egress": False}
    for pol in policies:
        if pol["metadata"].get("namespace") != pod.namespace or not selects(pol["spec"].get("podSelector"), pod.labels):
            continue
        spec = pol["spec"]
        types = spec.get("policyTypes") or (["Ingress", "Egress"] if "egress" in spec else ["Ingress"])
        for direction in types:
            selected[direction] = True
            for rule in spec.get(direction.lower()) or []:
                peers = _peers(rule.get("from" if direction == "Ingress" else "to"), pod.namespace, pods, namespaces)
                if peers == []:
                    continue
                field = "saddr" if direction == "Ingress" else "daddr"
                match = f"ip {field} {{ {', '.join(peers)} }} " if peers is not None else ""
                named = pod.ports if direction == "Ingress" else {}
                for port in _ports(rule.get("ports"), named):
                    chains[direction].append(f"{match}{port} accept".replace("  ", " "))
    hooks = {"Ingress": "input", "Egress": "output"}
    lines = ["table inet smk {"]
    for direction, hook in hooks.items():
        policy = "drop" if selected[direction] else "accept"
        lines.append(f"  chain {hook} {{ type filter hook {hook} priority 0; policy {policy};")
        lines += [f"    {r}" for r in chains[direction]] if selected[direction] else []
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def apply(netns: str, script: str) -> None:
    """Replace the namespace's table atomically (one nft transaction)."""
    flush = "table inet smk\ndelete table inet smk\n"
    subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-f", "-"],
        input=flush + script,
        text=True,
        check=True,
        capture_output=True,
    )
