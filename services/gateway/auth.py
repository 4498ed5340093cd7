"""Who may call what: OIDC bearer tokens verified against the IdP's JWKS, roles per RPC.

Tokens are checked by PyJWT: signature with a key from the issuer's JWKS
(cached; fetched again for an unknown `kid`, at most every few seconds so
random kids cannot hammer the IdP), `exp`, `nbf`, `iss`, `aud`. Only
asymmetric algorithms are accepted, so `alg: none` and HS256 signed with
the public key are refused before any key is used.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request

import jwt

from smily.common.caller import ANONYMOUS, Caller
from smily.common.config import Settings
from smily.common.errors import PermissionDenied, Unauthenticated, Unavailable

log = logging.getLogger("smily.auth")

SEARCH, INGEST, ADMIN = "smily.search", "smily.ingest", "smily.admin"
_SERVICE = "/smily.gateway.v1.GatewayService/"
ROLES: dict[str, str | tuple[str, ...]] = {
    **{
        _SERVICE + m: SEARCH
        for m in (
            "Search",
            "SearchSlides",
            "ReadRegion",
            "ListSlides",
            "GetSlide",
            "ListConcepts",
            "GetIndexInfo",
        )
    },
    **{
        _SERVICE + m: INGEST for m in ("IngestSlide", "IngestCase", "CancelOperation", "CreateConcept", "DeleteConcept")
    },
    _SERVICE + "DeleteSlide": ADMIN,
    # Also the ingest role's, for the operations that caller started (the servicer checks whose).
    _SERVICE + "GetOperation": (SEARCH, INGEST),
}
ASYMMETRIC = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"})
# Clock skew tolerated between the IdP and us.
LEEWAY_S = 30
# Least time between two JWKS fetches caused by unknown key ids.
REFETCH_S = 10.0
NONE_WARNING = "warning: SMILY_AUTH=none: the gateway asks no caller who they are; for a local run only"


def role_for(method: str) -> tuple[str, ...]:
    """The roles an RPC admits (any one will do); anything not listed (a future RPC, reflection) needs admin."""
    need = ROLES.get(method, ADMIN)
    return (need,) if isinstance(need, str) else need


def authorise(caller: Caller, method: str) -> None:
    needs = role_for(method)
    if ADMIN not in caller.roles and not caller.roles.intersection(needs):
        raise PermissionDenied(f"this call needs the role {' or '.join(needs)}")


def _roles(claims: dict, path: str) -> frozenset[str]:
    value: object = claims
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list):
        return frozenset(v for v in value if isinstance(v, str))
    return frozenset()


class OpenAccess:
    """SMILY_AUTH=none: everyone is the anonymous admin."""

    def __init__(self):
        log.warning(NONE_WARNING)

    def authenticate(self, metadata) -> Caller:
        return Caller(ANONYMOUS.subject, roles=frozenset({ADMIN}))


class OidcVerifier:
    def __init__(self, issuer: str, audience: str, jwks_url: str = "", roles_claim: str = "roles"):
        if not issuer or not audience:
            raise ValueError(
                "SMILY_AUTH=oidc needs SMILY_OIDC_ISSUER and SMILY_OIDC_AUDIENCE (or SMILY_AUTH=none for a local run)"
            )
        self._issuer, self._audience, self._roles_claim = issuer, audience, roles_claim
        self._jwks_url = jwks_url
        self._jwks: jwt.PyJWKClient | None = None
        self._lock = threading.Lock()
        self._last_fetch = 0.0

    def _client(self) -> jwt.PyJWKClient:
        with self._lock:
            if self._jwks is None:
                url = self._jwks_url or self._discover()
                self._jwks = jwt.PyJWKClient(url, cache_jwk_set=True, lifespan=3600, timeout=5)
            return self._jwks

    def _discover(self) -> str:
        url = self._issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                doc = json.load(resp)
        except (OSError, ValueError) as exc:
            log.warning("OIDC discovery failed", extra={"error": type(exc).__name__})
            raise Unavailable("the identity provider cannot be reached") from None
        if doc.get("issuer") != self._issuer or not doc.get("jwks_uri"):
            log.error("OIDC discovery document does not match SMILY_OIDC_ISSUER")
            raise Unavailable("the identity provider is misconfigured")
        return doc["jwks_uri"]

    def _key(self, kid: str):
        client = self._client()
        try:
            for refresh in (False, True):
                if refresh:
                    with self._lock:  # an unknown kid: the IdP may have rotated its keys
                        if time.monotonic() - self._last_fetch < REFETCH_S:
                            break
                        self._last_fetch = time.monotonic()
                for key in client.get_signing_keys(refresh=refresh):
                    if key.key_id == kid:
                        return key
        except jwt.PyJWKClientConnectionError:
            raise Unavailable("the identity provider cannot be reached") from None
        except jwt.PyJWKClientError:
            pass  # a JWKS without usable keys
        raise Unauthenticated("invalid token")

    def verify(self, token: str) -> Caller:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("malformed token") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ASYMMETRIC or not isinstance(kid, str):
            raise Unauthenticated("invalid token")
        key = self._key(kid)
        try:  # a key of another type than alg's (an RSA key for ES256) fails here too
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self._issuer,
                leeway=LEEWAY_S,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("token not yet valid") from None
        except jwt.PyJWTError:
            raise Unauthenticated("invalid token") from None
        return Caller(str(claims["sub"]), self._issuer, _roles(claims, self._roles_claim))

    def authenticate(self, metadata) -> Caller:
        values = [v for k, v in metadata if k == "authorization"]
        if len(values) != 1:
            raise Unauthenticated("missing bearer token" if not values else "more than one authorization header")
        scheme, _, token = values[0].partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("missing bearer token")
        return self.verify(token.strip())


def authenticator(settings: Settings):
    mode = settings.auth.strip().lower()
    if mode == "none":
        return OpenAccess()
    if mode == "oidc":
        return OidcVerifier(
            settings.oidc_issuer, settings.oidc_audience, settings.oidc_jwks_url, settings.oidc_roles_claim
        )
    raise ValueError(f"SMILY_AUTH must be oidc or none, got {settings.auth!r}")
