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

from smily.common import rpcmeta, tenancy
from smily.common.caller import ANONYMOUS, Caller
from smily.common.config import AuthSettings, ConfigError
from smily.common.errors import PermissionDenied, Unauthenticated, Unavailable

log = logging.getLogger("smily.auth")

SEARCH, INGEST, ADMIN = "smily.search", "smily.ingest", "smily.admin"
# Issue 24: lists tenants and moves slides between them; no role of a tenant implies it.
OPERATOR = "smily.operator"
NO_TENANT = "the token names no tenant"
# Method path -> the roles that may call it: (smily.options.v1.role) in gateway.proto.
ROLES = rpcmeta.ROLES
ASYMMETRIC = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"})
# Clock skew tolerated between the IdP and us.
LEEWAY_S = 30
# Least time between two JWKS fetches caused by unknown key ids.
REFETCH_S = 10.0
NONE_WARNING = "warning: SMILY_AUTH=none: the gateway asks no caller who they are; for a local run only"


def roles_for(method: str) -> frozenset[str]:
    """The roles that may call an RPC; anything not listed (reflection, say) needs admin."""
    return ROLES.get(method, frozenset({ADMIN}))


def authorise(caller: Caller, method: str) -> None:
    allowed = roles_for(method)
    # Admin may do anything within its tenant; the operator's calls cross tenants, so admin is not enough.
    admin = ADMIN in caller.roles and OPERATOR not in allowed
    if not admin and not allowed & caller.roles:
        raise PermissionDenied(f"this call needs the role {' or '.join(sorted(allowed))}")


def _claim(claims: dict, path: str) -> object:
    """The claim at a dotted path (realm_access.roles), None when absent."""
    value: object = claims
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _roles(claims: dict, path: str) -> frozenset[str]:
    value = _claim(claims, path)
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list):
        return frozenset(v for v in value if isinstance(v, str))
    return frozenset()


class Tenancy:
    """Which tenant a verified token names, and what that tenant may read (SMILY_OIDC_TENANT_CLAIM,
    SMILY_DEFAULT_TENANT, SMILY_TENANT_GRANTS)."""

    def __init__(self, claim: str = "", default: str = tenancy.DEFAULT, grants: str = ""):
        if not tenancy.valid(default):
            raise ConfigError("SMILY_DEFAULT_TENANT must be 1-64 characters of A-Z a-z 0-9 . _ -")
        try:
            self._grants = tenancy.parse_grants(grants)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self._claim, self.default = claim.strip(), default

    def of(self, claims: dict) -> str:
        """The token's tenant; PERMISSION_DENIED when a claim is configured and the token names none."""
        if not self._claim:
            return self.default
        value = _claim(claims, self._claim)
        if not tenancy.valid(value):
            raise PermissionDenied(NO_TENANT)
        return str(value)

    def caller(self, subject: str, issuer: str, roles: frozenset[str], tenant: str) -> Caller:
        return Caller(subject, issuer, roles, tenant, tenancy.readable(tenant, self._grants))


class OpenAccess:
    """SMILY_AUTH=none: everyone is the anonymous admin of the default tenant, and its operator."""

    def __init__(self, tenants: Tenancy | None = None):
        log.warning(NONE_WARNING)
        self._tenants = tenants or Tenancy()

    def authenticate(self, metadata) -> Caller:
        t = self._tenants
        return t.caller(ANONYMOUS.subject, "", frozenset({ADMIN, OPERATOR}), t.default)


class OidcVerifier:
    def __init__(
        self, issuer: str, audience: str, jwks_url: str = "", roles_claim: str = "roles", tenants: Tenancy | None = None
    ):
        if not issuer or not audience:
            raise ConfigError(
                "SMILY_AUTH=oidc needs SMILY_OIDC_ISSUER and SMILY_OIDC_AUDIENCE (or SMILY_AUTH=none for a local run)"
            )
        self._issuer, self._audience, self._roles_claim = issuer, audience, roles_claim
        self._tenants = tenants or Tenancy()
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
        roles = _roles(claims, self._roles_claim)
        return self._tenants.caller(str(claims["sub"]), self._issuer, roles, self._tenants.of(claims))

    def authenticate(self, metadata) -> Caller:
        values = [v for k, v in metadata if k == "authorization"]
        if len(values) != 1:
            raise Unauthenticated("missing bearer token" if not values else "more than one authorization header")
        scheme, _, token = values[0].partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("missing bearer token")
        return self.verify(token.strip())


def authenticator(auth: AuthSettings):
    mode = auth.auth.strip().lower()
    tenants = Tenancy(auth.oidc_tenant_claim, auth.default_tenant, auth.tenant_grants)
    if mode == "none":
        return OpenAccess(tenants)
    if mode == "oidc":
        return OidcVerifier(auth.oidc_issuer, auth.oidc_audience, auth.oidc_jwks_url, auth.oidc_roles_claim, tenants)
    raise ConfigError(f"SMILY_AUTH must be oidc or none, got {auth.auth!r}")
