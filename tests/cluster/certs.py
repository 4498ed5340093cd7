"""cert-manager, as far as the box needs it: Issuers (selfSigned, ca) and Certificates.

Each Certificate is issued with exactly its commonName, dnsNames, ipAddresses, usages,
isCA, duration and private key algorithm, into a kubernetes.io/tls Secret of its
secretName (tls.crt, tls.key, ca.crt), as cert-manager writes it. Re-issuing makes a
new key (rotationPolicy: Always) and updates the Secret; kubelet carries it to the pods.
"""

from __future__ import annotations

import datetime
import ipaddress
import re

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

EKU = {
    "server auth": ExtendedKeyUsageOID.SERVER_AUTH,
    "client auth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "code signing": ExtendedKeyUsageOID.CODE_SIGNING,
    "email protection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
}
KU = {
    "digital signature": "digital_signature",
    "key encipherment": "key_encipherment",
    "cert sign": "key_cert_sign",
    "crl sign": "crl_sign",
    "content commitment": "content_commitment",
    "data encipherment": "data_encipherment",
    "key agreement": "key_agreement",
}
# cert-manager's default usages when a Certificate names none.
DEFAULT_USAGES = ["digital signature", "key encipherment"]


def _duration(text: str | None, default_h: float = 2160) -> datetime.timedelta:
    if not text:
        return datetime.timedelta(hours=default_h)
    units = {"h": 3600, "m": 60, "s": 1}
    return datetime.timedelta(seconds=sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)([hms])", text)))


def _key(spec: dict):
    pk = spec.get("privateKey") or {}
    algorithm = pk.get("algorithm", "RSA")
    if algorithm == "ECDSA":
        return ec.generate_private_key({256: ec.SECP256R1(), 384: ec.SECP384R1()}[int(pk.get("size", 256))])
    if algorithm == "RSA":
        return rsa.generate_private_key(public_exponent=65537, key_size=int(pk.get("size", 2048)))
    raise ValueError(f"private key algorithm {algorithm} is not supported by the box")


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class CertManager:
    def __init__(self, objs: list[dict]):
        self.issuers = {
            (o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in objs if o["kind"] == "Issuer"
        }
        self.certificates = [o for o in objs if o["kind"] == "Certificate"]

    def issue_all(self, secrets: dict[tuple[str | None, str], dict]) -> list[str]:
        """Issue every Certificate (CAs first, as cert-manager converges) into secrets; returns their secret names."""
        pending = list(self.certificates)
        done = []
        while pending:
            progressed = False
            for cert in list(pending):
                if self._ready_to_issue(cert, secrets):
                    self.issue(cert, secrets)
                    pending.remove(cert)
                    done.append(cert["spec"]["secretName"])
                    progressed = True
            if not progressed:
                names = [c["metadata"]["name"] for c in pending]
                raise RuntimeError(f"Certificates {names} cannot be issued: their Issuer or its Secret is missing")
        return done

    def _issuer(self, cert: dict) -> dict:
        ref = cert["spec"]["issuerRef"]
        if ref.get("kind", "Issuer") != "Issuer":
            raise RuntimeError(f"{ref.get('kind')} is not in the box: name an Issuer of the overlay")
        key = (cert["metadata"].get("namespace"), ref["name"])
        if key not in self.issuers:
            raise RuntimeError(f"Certificate {cert['metadata']['name']}: Issuer {ref['name']} is not in the manifests")
        return self.issuers[key]

    def _ready_to_issue(self, cert: dict, secrets: dict) -> bool:
        issuer = self._issuer(cert)["spec"]
        if "selfSigned" in issuer:
            return True
        if "ca" in issuer:
            return (cert["metadata"].get("namespace"), issuer["ca"]["secretName"]) in secrets
        raise RuntimeError(f"issuer kind {list(issuer)} is not in the box (selfSigned and ca are)")

    def issue(self, cert: dict, secrets: dict) -> None:
        spec = cert["spec"]
        ns = cert["metadata"].get("namespace")
        issuer = self._issuer(cert)["spec"]
        key = _key(spec)
        now = datetime.datetime.now(datetime.timezone.utc)
        subject = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, spec["commonName"])] if spec.get("commonName") else []
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + _duration(spec.get("duration")))
        )
        sans = [x509.DNSName(n) for n in spec.get("dnsNames") or []]
        sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in spec.get("ipAddresses") or []]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        usages = spec.get("usages") or DEFAULT_USAGES
        unknown = [u for u in usages if u not in KU and u not in EKU]
        if unknown:
            raise ValueError(f"usages {unknown} are not in the box")
        ku = {v: False for v in KU.values()}
        for u in usages:
            if u in KU:
                ku[KU[u]] = True
        if spec.get("isCA"):
            ku["key_cert_sign"] = ku["crl_sign"] = ku["digital_signature"] = True
        if not any(ku.values()):
            # Only extended usages named: cert-manager still sets its default key usages.
            ku["digital_signature"] = True
            ku["key_encipherment"] = isinstance(key, rsa.RSAPrivateKey)
        builder = builder.add_extension(x509.KeyUsage(**ku, encipher_only=False, decipher_only=False), critical=True)
        ekus = [EKU[u] for u in usages if u in EKU]
        if ekus:
            builder = builder.add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
        builder = builder.add_extension(
            x509.BasicConstraints(ca=bool(spec.get("isCA")), path_length=None), critical=True
        )
        if "selfSigned" in issuer:
            signed = builder.issuer_name(subject).sign(key, hashes.SHA256())
            ca_pem = _pem(signed)
        else:
            ca_secret = secrets[(ns, issuer["ca"]["secretName"])]["data"]
            ca_cert = x509.load_pem_x509_certificate(ca_secret["tls.crt"])
            ca_key = serialization.load_pem_private_key(ca_secret["tls.key"], None)
            signed = builder.issuer_name(ca_cert.subject).sign(ca_key, hashes.SHA256())
            ca_pem = ca_secret["tls.crt"]
        secrets[(ns, spec["secretName"])] = {
            "type": "kubernetes.io/tls",
            "data": {
                "tls.crt": _pem(signed),
                "tls.key": key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                ),
                "ca.crt": ca_pem,
            },
        }
