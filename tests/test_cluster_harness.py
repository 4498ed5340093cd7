"""The cluster in a box's own rules (tests/cluster/), checked on the rendered overlays:
certificates exactly as the Certificates say, NetworkPolicies as nftables rules, kubelet's
$(VAR) expansion, and `make images`' view of pip's settings. No images needed."""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import redis
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .cluster import policy
from .cluster.certs import CertManager
from .cluster.kubelet import expand
from .cluster.manifests import render, replicas
from .conftest import need
from .helpers.wait import wait_until

ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def k8s_tree() -> Path:
    """deploy/k8s with the Secret values `make k8s-secrets` generates (a fresh clone has none),
    in a folder of its own: tests never write into the source tree."""
    from smily import k8s_secrets

    tree = Path(tempfile.mkdtemp(prefix="smily-k8s-")) / "k8s"
    shutil.copytree(ROOT / "deploy" / "k8s", tree, ignore=shutil.ignore_patterns("*.env"))
    k8s_secrets.write(str(tree / "base" / "secrets"))
    return tree


def cpu_objects() -> list[dict]:
    return render(k8s_tree() / "overlays" / "cpu")


def test_certificates_are_issued_exactly_as_declared():
    objs = cpu_objects()
    secrets: dict = {}
    certs = [o for o in objs if o["kind"] in ("Issuer", "Certificate")]
    issued = CertManager(certs).issue_all(secrets)
    declared = [o for o in objs if o["kind"] == "Certificate"]
    assert sorted(issued) == sorted(c["spec"]["secretName"] for c in declared)
    ca = x509.load_pem_x509_certificate(secrets[("smily", "smily-ca")]["data"]["tls.crt"])
    for c in declared:
        spec = c["spec"]
        data = secrets[("smily", spec["secretName"])]["data"]
        cert = x509.load_pem_x509_certificate(data["tls.crt"])
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == spec["commonName"]
        if spec.get("isCA"):
            assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
            continue
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.DNSName) == spec["dnsNames"]
        ekus = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        wanted = {"server auth": ExtendedKeyUsageOID.SERVER_AUTH, "client auth": ExtendedKeyUsageOID.CLIENT_AUTH}
        assert ekus == {wanted[u] for u in spec["usages"]}
        cert.verify_directly_issued_by(ca)
        assert data["ca.crt"] == secrets[("smily", "smily-ca")]["data"]["tls.crt"]


def test_network_policies_become_default_deny_with_the_declared_edges():
    objs = cpu_objects()
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    namespaces = {"smily": {"kubernetes.io/metadata.name": "smily"}, "lis": {"smily.io/gateway-client": "true"}}

    def ep(name, ns, labels, ip):
        return policy.Endpoint(name, ns, labels, ip, {})

    gateway = ep(
        "gw", "smily", {"app.kubernetes.io/name": "smily-gateway", "app.kubernetes.io/part-of": "smily"}, "10.0.0.2"
    )
    index = ep(
        "ix", "smily", {"app.kubernetes.io/name": "smily-index", "app.kubernetes.io/part-of": "smily"}, "10.0.0.3"
    )
    http = ep("web", "smily", {"app.kubernetes.io/name": "smily-http", "smily.io/gateway-client": "true"}, "10.0.0.4")
    lis = ep("lis", "lis", {}, "10.0.0.9")
    pods = [gateway, index, http, lis]
    gw_rules = policy.ruleset(gateway, policies, pods, namespaces, "10.0.0.1")
    assert "chain input { type filter hook input priority 0; policy drop;" in gw_rules
    assert "chain output { type filter hook output priority 0; policy drop;" in gw_rules
    # Callers labelled smily.io/gateway-client (pod or namespace) reach 50050, and only them.
    (admit,) = [line for line in gw_rules.splitlines() if "tcp dport 50050" in line]
    assert "10.0.0.4" in admit and "10.0.0.9" in admit and "10.0.0.3" not in admit
    assert "ip daddr { 10.0.0.3 } tcp dport 50053 accept" in gw_rules
    ix_rules = policy.ruleset(index, policies, pods, namespaces, "10.0.0.1")
    assert "10.0.0.9" not in ix_rules, "the LIS must not reach an index replica"
    # A namespace no policy selects is left open.
    assert "policy accept" in policy.ruleset(lis, policies, pods, namespaces, "10.0.0.1")


def test_replicas_come_from_the_hpa_when_the_workload_names_none():
    objs = cpu_objects()
    gateway = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "smily-gateway")
    index = next(o for o in objs if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "smily-index-0")
    assert replicas(objs, gateway) == 2 and replicas(objs, index) == 2


def test_kubernetes_variable_expansion():
    env = {"REDIS_PASSWORD": "s3cret"}
    assert expand("--requirepass $(REDIS_PASSWORD)", env) == "--requirepass s3cret"
    assert expand("$$(REDIS_PASSWORD) $(UNSET)", env) == "$(REDIS_PASSWORD) $(UNSET)"


def test_redis_takes_its_password_from_the_mounted_file_not_its_command_line(tmp_path):
    """The rendered Redis container's command, run here with redis-server: the password comes from
    the Secret's file (mounted at the path the command reads), and is in neither its command line nor
    its environment. Kubernetes' $(VAR) expansion leaves the shell's $(cat ...) alone."""
    if not shutil.which("redis-server"):
        need("redis-server", "install it with `apt-get install redis-server`")
    objs = cpu_objects()
    deploy = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "smily-redis")
    spec = deploy["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    (volume,) = [v for v in spec["volumes"] if [i["key"] for i in v.get("secret", {}).get("items", [])] == ["password"]]
    (mount,) = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume["name"]]
    command = [expand(a, {}) for a in container["command"]]
    assert command == container["command"]
    password = secrets.token_urlsafe(32)
    files = tmp_path / "secret"
    files.mkdir()
    (files / volume["secret"]["items"][0]["path"]).write_text(password + "\n")  # as kubectl writes it
    script = command[2].replace(mount, str(files))
    assert script != command[2], "the command reads no file from the Secret's mount"
    sock = tmp_path / "redis.sock"
    # The rendered args name TLS files and /data: the box's concern; here a socket in tmp_path.
    args = ["--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    proc = subprocess.Popen([*command[:2], script, *command[3:], *args], env={"PATH": os.environ["PATH"]})
    try:
        wait_until("redis-server listens", sock.exists, deadline_s=30)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(unix_socket_path=str(sock)).ping()
        assert redis.Redis(unix_socket_path=str(sock), password=password).ping()
        # exec: the shell is gone, Redis itself runs, the password in none of its /proc files.
        assert Path(f"/proc/{proc.pid}/exe").resolve().name.startswith("redis")
        for name in ("cmdline", "environ"):
            assert password.encode() not in Path(f"/proc/{proc.pid}/{name}").read_bytes(), name
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_make_images_lists_every_image_the_overlays_name():
    out = subprocess.run(
        [sys.executable, "tools/images.py", "--list"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    objs = cpu_objects()
    named = {
        c["image"]
        for o in objs
        if o["kind"] in ("Deployment", "StatefulSet")
        for c in o["spec"]["template"]["spec"]["containers"]
        if c["image"].startswith("localhost/smily/")
    }
    assert named <= set(out), named - set(out)


def test_the_ingress_component_names_its_issuer_once(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    base = k8s_tree()
    (site / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: smily\n"
        f"resources: [{os.path.relpath(base / 'overlays' / 'cpu', site)}]\n"
        f"components: [{os.path.relpath(base / 'components' / 'ingress', site)}]\n"
    )
    objs = render(site)
    ingresses = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Ingress"}
    assert set(ingresses) == {"smily-http", "smily-gateway"}
    assert {i["metadata"]["annotations"]["cert-manager.io/cluster-issuer"] for i in ingresses.values()} == {
        "hospital-public"
    }
    assert not [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "smily-ingress"]
    grpc = ingresses["smily-gateway"]
    assert grpc["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPCS"
    secret = grpc["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-ssl-secret"]
    certs = {o["spec"]["secretName"] for o in objs if o["kind"] == "Certificate"}
    assert secret == "smily/smily-ingress-tls" and "smily-ingress-tls" in certs
    for ing in ingresses.values():
        assert ing["spec"]["tls"] and ing["spec"]["tls"][0]["hosts"] == [ing["spec"]["rules"][0]["host"]]
        backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
        svc = next(o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == backend["name"])
        assert backend["port"]["name"] in [p["name"] for p in svc["spec"]["ports"]]
