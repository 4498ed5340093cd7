"""A small OIDC identity provider on loopback: discovery, a JWKS, and token minting.

Keys are made at test time; tokens are signed by PyJWT. The JWKS can be
changed while it runs (key rotation) and counts how often it was fetched.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

AUDIENCE = "smily"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class IdP:
    def __init__(self):
        self.keys = {
            "rsa-1": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ec-1": ec.generate_private_key(ec.SECP256R1()),
        }
        self.published = set(self.keys)
        self.jwks_fetches = 0
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/realms/test/.well-known/openid-configuration":
                    body = {"issuer": idp.issuer, "jwks_uri": idp.issuer + "/protocol/openid-connect/certs"}
                elif self.path == "/realms/test/protocol/openid-connect/certs":
                    idp.jwks_fetches += 1
                    body = idp.jwks()
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.issuer = f"http://127.0.0.1:{self._server.server_port}/realms/test"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def jwks(self) -> dict:
        out = []
        for kid in sorted(self.published):
            key = self.keys[kid]
            if isinstance(key, rsa.RSAPrivateKey):
                jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
                jwk["alg"] = "RS256"
            else:
                jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
                jwk["alg"] = "ES256"
            out.append({**jwk, "kid": kid, "use": "sig"})
        return {"keys": out}

    def add_key(self, kid: str, publish: bool = True) -> None:
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if publish:
            self.published.add(kid)

    def claims(self, roles=(), **changes) -> dict:
        now = int(time.time())
        c = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": "user-1",
            "iat": now,
            "nbf": now - 5,
            "exp": now + 600,
            "roles": list(roles),
        }
        c.update(changes)
        return {k: v for k, v in c.items() if v is not None}

    def token(self, roles=(), kid: str = "rsa-1", **changes) -> str:
        alg = "ES256" if kid.startswith("ec") else "RS256"
        return jwt.encode(self.claims(roles, **changes), self.keys[kid], algorithm=alg, headers={"kid": kid})

    def public_pem(self, kid: str = "rsa-1") -> bytes:
        return (
            self.keys[kid]
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )

    # -- forgeries ------------------------------------------------------------
    def unsigned(self, roles=()) -> str:
        """alg: none, no signature."""
        head = _b64(json.dumps({"alg": "none", "typ": "JWT", "kid": "rsa-1"}).encode())
        return f"{head}.{_b64(json.dumps(self.claims(roles)).encode())}."

    def hs256_with_public_key(self, roles=()) -> str:
        """The classic confusion attack: HMAC keyed with the RSA public key the IdP publishes."""
        head = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
        body = _b64(json.dumps(self.claims(roles)).encode())
        sig = hmac.new(self.public_pem(), f"{head}.{body}".encode(), hashlib.sha256).digest()
        return f"{head}.{body}.{_b64(sig)}"


def tampered(token: str) -> str:
    """The same token with one signature byte changed."""
    head, body, sig = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)))
    raw[len(raw) // 2] ^= 0x01
    return f"{head}.{body}.{_b64(bytes(raw))}"


def escalated(token: str, roles=("smily.admin",)) -> str:
    """The same signature over a payload whose roles were rewritten."""
    head, body, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["roles"] = list(roles)
    return f"{head}.{_b64(json.dumps(claims).encode())}.{sig}"
