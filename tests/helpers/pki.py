"""A throwaway PKI made at test time: a CA, server and client certificates."""

from __future__ import annotations

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class CA:
    def __init__(self, directory: str, name: str = "smily-test-ca"):
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.path = os.path.join(directory, f"{name}.pem")
        with open(self.path, "wb") as fh:
            fh.write(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        name: str,
        dns=("localhost",),
        ips=("127.0.0.1",),
        ca: CA | None = None,
        directory: str | None = None,
        cn: str | None = None,
        san: bool = True,
    ) -> tuple[str, str]:
        """A certificate for server and client use, SAN = name + dns + ips; returns (cert path, key path).

        ca: sign with another CA (a stranger's certificate). directory: where to write the
        pair (default: the CA's own), e.g. to renew a certificate without touching the first.
        cn: a subject CN other than name; san=False: no SAN extension at all (CN only)."""
        signer = ca or self
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        names = [x509.DNSName(n) for n in (name, *dns)] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn or name))
            .issuer_name(signer.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(signer.key, hashes.SHA256())
        where = directory or self.dir
        os.makedirs(where, exist_ok=True)
        cert_path, key_path = (os.path.join(where, f"{name}.{ext}") for ext in ("crt", "key"))
        # Write the key first and swap both in with rename, as a Secret update does.
        for path, data in ((key_path, _pem_key(key)), (cert_path, cert.public_bytes(serialization.Encoding.PEM))):
            with open(path + ".tmp", "wb") as fh:
                fh.write(data)
            os.replace(path + ".tmp", path)
        return cert_path, key_path
