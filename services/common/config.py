"""Settings for every service, read from SMILY_* environment variables.

The knobs are grouped by concern, one frozen dataclass per group
(`settings.gateway`, `settings.tls`, ...), and a constructor takes the group it
needs. A field keeps one name everywhere: `redis_url` in `settings.gateway` is
set by `SMILY_REDIS_URL`, so field names are unique across groups (checked
below) and a variable never names its group. `settings.server` holds what every
process shares (bind host, metrics, health port, logging).

Lists use the OS path separator (":" on Linux), except lists of addresses and
numbers, which use ",". Booleans are 1/0, true/false, yes/no or on/off; anything
else is an error naming the variable.

Secrets come as files (a mounted Kubernetes Secret), not in the environment:
every string setting is also read from the file SMILY_<FIELD>_FILE names, its
trailing newline stripped (`SMILY_REDIS_PASSWORD_FILE=/etc/smily/redis/password`).
Setting both is an error. A setting with a `_file` twin of its own
(view_session_key_file) and a path setting (`*_file`) keep their meaning.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from .tiling import DEFAULT_MIN_TISSUE, DEFAULT_MPPS, DEFAULT_STRIDE, DEFAULT_TILE_SIZE


class ConfigError(ValueError):
    """A setting missing or wrong: the message names the SMILY_* variable to set."""


@dataclass(frozen=True)
class ServerSettings:
    """What every process shares."""

    # Address the servers bind to; Kubernetes manifests set 0.0.0.0.
    bind_host: str = "127.0.0.1"
    # One Prometheus endpoint per process; 0 turns it off.
    metrics_port: int = 9100
    # Plaintext port serving only the gRPC health service (kubelet's gRPC probes
    # cannot speak TLS); 0 = off. One service per process when set.
    health_port: int = 0
    worker_threads: int = 16
    # Seconds an in-flight RPC may finish in after SIGTERM.
    shutdown_grace_s: float = 10.0
    log_level: str = "INFO"
    # gRPC server reflection, for debugging only.
    reflection: bool = False


@dataclass(frozen=True)
class LimitsSettings:
    """Issue 13: every request bounded."""

    # Most RPCs one server runs at once; more get RESOURCE_EXHAUSTED.
    max_concurrent_rpcs: int = 64
    # Largest region (pixels at the output resolution) one ReadRegion returns.
    max_region_pixels: int = 4096 * 4096
    # Largest uploaded image (width x height, read from its header before any decoding).
    max_image_pixels: int = 4096 * 4096
    # PNG/JPEG decodes one process runs at once (each holds up to 4 bytes per pixel).
    image_decodes: int = 2
    # Tiles one slide may be cut into (the grid, counted before any planning).
    max_tiles_per_slide: int = 100_000
    # Ingests waiting for a worker on one gateway; more get RESOURCE_EXHAUSTED.
    max_queued_ingests: int = 32
    # Of those, the most one tenant's ingests may hold (issue 24); 0 = no per-tenant cap.
    max_queued_ingests_per_tenant: int = 0
    # Whole-slide queries (SearchSlides) streaming a slide at once on one gateway.
    max_slide_queries: int = 2
    # RPCs one caller (caller.caller_of: token subject, else peer host) may have in flight on the gateway; 0 = no quota.
    max_rpcs_per_caller: int = 32
    # RPCs one tenant's callers together may have in flight on the gateway; 0 = no quota.
    max_rpcs_per_tenant: int = 0


@dataclass(frozen=True)
class TlsSettings:
    """Trust boundary (issue 12)."""

    # Plaintext gRPC without certificates: only for the local embedded run
    # (`make demo`, `make up`, tests); otherwise a server without TLS refuses to start.
    plaintext: bool = False
    # PEM files, re-read when they change (cert-manager rotates them). The
    # certificate is also the client certificate the gateway dials backends with.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # CA that clients verify servers with and, under mTLS, servers verify clients with.
    tls_ca_file: str = ""
    # "require": servers demand a client certificate from the CA (mTLS); "none": they do not.
    tls_client_auth: str = "none"
    # Under mTLS, the certificate identities (SAN DNS/URI/IP or CN) the backends
    # accept: the gateway's; the index accepts tls_index_clients too (tooling).
    tls_backend_clients: tuple[str, ...] = ("smily-gateway",)
    tls_index_clients: tuple[str, ...] = ("smily-tooling",)
    # Issue 19: the embedder reads tiles from the tiler itself (EmbedSlide), so under
    # mTLS the tiler accepts these identities too.
    tls_tiler_clients: tuple[str, ...] = ("smily-embedder",)


@dataclass(frozen=True)
class AuthSettings:
    """The gateway's callers and their audit trail."""

    # "oidc" (bearer tokens from the IdP) or "none" (local use only).
    auth: str = "oidc"
    oidc_issuer: str = ""
    oidc_audience: str = ""
    # Empty: the jwks_uri of {issuer}/.well-known/openid-configuration.
    oidc_jwks_url: str = ""
    # Claim holding the caller's roles; a dotted path reaches nested claims
    # (Keycloak: realm_access.roles).
    oidc_roles_claim: str = "roles"
    # Issue 24: the claim naming the caller's tenant (a dotted path, as oidc_roles_claim);
    # empty: every caller is in default_tenant. Grants: "reader=owner,owner;reader=owner".
    oidc_tenant_claim: str = ""
    default_tenant: str = "default"
    tenant_grants: str = ""
    # Audit trail: JSON lines appended to this file; empty = stdout (logger smily.audit).
    audit_log: str = ""
    # Key the HTTP front end mints view-session ids with and the gateway verifies them with
    # (a Secret shared by both; the _file form wins). Empty: no sessions, every read audited on its own.
    view_session_key: str = ""
    view_session_key_file: str = ""
    # A view session's lifetime; its record (reads covered, bounding region) is written when it ends.
    view_session_ttl_s: float = 300.0


@dataclass(frozen=True)
class TilerSettings:
    tiler_port: int = 50051
    # Where clients (gateway, embedder) dial it (dns:///name:port in Kubernetes).
    tiler_target: str = "127.0.0.1:50051"
    # Directories slides may be read from.
    slide_roots: tuple[str, ...] = field(default_factory=lambda: ("data/samples",))
    # Processes that parse slide files (isolated from the server, in parallel).
    tiler_readers: int = 2
    # Seconds one read may take before its process is killed and replaced.
    tiler_read_timeout_s: float = 60.0
    # Issue 14 (PACS): DICOMweb archives slides may be read from, ","-separated
    # NAME=URL (e.g. pacs=https://pacs.example/dicom-web); a caller names only NAME.
    dicomweb_url: tuple[str, ...] = ()
    # File of one line per archive: "NAME basic USER:PASSWORD" or "NAME bearer TOKEN".
    dicomweb_credentials_file: str = ""
    # PEM CA bundle for the archives' TLS; empty: the system's.
    dicomweb_ca: str = ""
    # Per open series and reader process: decoded frames (and half that of encoded ones).
    dicomweb_frame_cache_mb: int = 64


@dataclass(frozen=True)
class EmbedderSettings:
    embedder_port: int = 50052
    embedder_target: str = "127.0.0.1:50052"
    # Embedders serving other models than embedder_target's (a migration's target; read by the gateway,
    # which asks each its model). Empty: the index can serve and migrate to that one model alone.
    model_embedder_targets: tuple[str, ...] = ()
    # Model repository and the model it serves, "<name>/<version>".
    model_repository: str = "models"
    model: str = "efficientnet-lite0/1"
    intra_op_threads: int = 0
    max_batch: int = 64
    # Dynamic batching: concurrent requests are coalesced up to preferred_batch
    # images or until the oldest has waited max_queue_delay_ms; 1 turns it off.
    # At most max_queue images wait; more get RESOURCE_EXHAUSTED.
    # 0 = automatic (issue 19): 32 on a GPU, off on the CPU, where a batch costs
    # per image anyway and waiting for company only adds latency.
    preferred_batch: int = 0
    max_queue_delay_ms: float = 2.0
    max_queue: int = 256
    # TensorRT only (when onnxruntime-gpu finds it): build FP16 engines.
    gpu_fp16: bool = False


@dataclass(frozen=True)
class IndexSettings:
    index_port: int = 50053
    index_target: str = "127.0.0.1:50053"
    # Index shards, ","-separated (addresses hold ":"); empty = index_target alone.
    # Each slide lives on the shard its id hashes to; a target may resolve to replicas.
    index_targets: tuple[str, ...] = ()
    # Where vectors and records live.
    index_dir: str = "var/index"
    # FAISS factory string used once a collection has index_ivf_threshold tiles;
    # empty = automatic (IVF{sqrt n},PQ{m}); "Flat" = always exact.
    index_factory: str = ""
    index_ivf_threshold: int = 200_000
    index_nprobe: int = 32
    # ANN candidates per hit re-scored from re-rank vectors held in RAM (<= 1: off).
    index_rerank: int = 100
    # The re-rank vectors' form: fp16 (2 B a dimension in RAM), sq8 (1 B), or storage
    # (none in RAM: read per search; docs/benchmarks.md).
    index_rerank_form: str = "fp16"
    index_snapshot_interval_s: float = 300.0
    # Cluster mode: postgresql://... makes this process a serving replica of shard
    # index_shard, with PostgreSQL as the system of record (empty: SQLite in index_dir).
    index_database_url: str = ""
    index_shard: int = 0


@dataclass(frozen=True)
class GatewaySettings:
    gateway_port: int = 50050
    # redis://host:port/db; empty uses an in-process cache (one replica only).
    redis_url: str = ""
    # Redis password when SMILY_REDIS_URL carries none (kept apart so the URL can live in a ConfigMap).
    redis_password: str = ""
    redis_timeout_s: float = 0.05
    cache_ttl_s: int = 24 * 3600
    # HMAC key authenticating cached values in Redis, shared by the gateway replicas
    # (a Secret). Empty: a random key per process, so a replica trusts only its own writes.
    cache_key: str = ""
    # Tiling a first ingest records in an empty index (later: the index's record wins).
    tile_mpp: float = DEFAULT_MPPS[0]
    # Issue 16: several tile resolutions in one ingest, ","-separated µm/px
    # (e.g. 0.5,1.0,2.0); empty: tile_mpp alone.
    tile_mpps: tuple[float, ...] = ()
    tile_size: int = DEFAULT_TILE_SIZE
    # Step between tiles as a fraction of the tile (0.5: half-overlapping tiles).
    tile_stride: float = DEFAULT_STRIDE
    min_tissue_fraction: float = DEFAULT_MIN_TISSUE
    embed_batch: int = 32
    max_concurrent_ingests: int = 2
    # Slide metadata key naming a slide's case (patient/accession), for exclude_query_case.
    case_key: str = "case_id"
    # Slide metadata keys ListSlides' metadata_query finds slides by, besides case_key
    # (","-separated; container_identifier: the barcode a DICOM slide carries).
    slide_search_keys: tuple[str, ...] = ("container_identifier", "barcode", "organ")
    # Slide metadata key whose values Search counts among its top-k hits (LabelStats, e.g.
    # "diagnosis"): a retrieval statistic shown with the results; empty: none.
    label_key: str = ""
    # Deadline for a downstream call when the caller gave none.
    backend_timeout_s: float = 30.0
    # A link per hit for a viewer, e.g.
    # https://viewer.example/?study={study}&series={series}&x={x}&y={y}&w={width}&h={height}
    viewer_url_template: str = ""
    # Hits of one slide overlapping a better one by at least this IoU are dropped (overlapping tiles).
    dedup_iou: float = 0.1
    # Dihedral transforms each query is also embedded under, merged by best score per tile,
    # ","-separated from: identity rot90 rot180 rot270 flip flip_rot90 flip_rot180 flip_rot270; empty: identity.
    query_transforms: tuple[str, ...] = ()
    # How the transformed queries are merged: "max" (best score per tile over one search
    # per transform) or "mean" (one search with the mean embedding).
    query_merge: str = "max"


@dataclass(frozen=True)
class HttpSettings:
    """HTTP/JSON API and viewer (issues 14 and 18): `smily serve http`."""

    http_port: int = 8080
    # The gateway it calls (it never dials a backend).
    http_gateway_target: str = "127.0.0.1:50050"
    # Largest request body accepted (JSON with base64 images, or multipart).
    http_max_body_bytes: int = 32 * 1024 * 1024
    # Deadline of one gateway call made for an HTTP request.
    http_timeout_s: float = 120.0
    # IIIF tiles kept in memory, per caller, for this many bytes and seconds.
    http_tile_cache_bytes: int = 256 * 1024 * 1024
    http_tile_cache_ttl_s: float = 300.0
    # The viewer's login (OIDC authorization code + PKCE, public client); no issuer: no login.
    viewer_oidc_issuer: str = ""
    viewer_oidc_client_id: str = ""
    viewer_oidc_scope: str = "openid"
    # CIDRs of proxies whose X-Forwarded-For is believed, ","-separated; empty: none.
    http_trusted_proxies: tuple[str, ...] = ()
    # Public base URL of the HTTP front end (https://smily.example), for IIIF ids; empty: path-only ids.
    http_public_url: str = ""
    # Seconds a cached tile may be served before the slide is checked again with the gateway
    # (deleted or re-ingested slides are dropped from the cache; the caller is re-authorised).
    http_slide_check_s: float = 5.0


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = ServerSettings()
    limits: LimitsSettings = LimitsSettings()
    tls: TlsSettings = TlsSettings()
    auth: AuthSettings = AuthSettings()
    tiler: TilerSettings = TilerSettings()
    embedder: EmbedderSettings = EmbedderSettings()
    index: IndexSettings = IndexSettings()
    gateway: GatewaySettings = GatewaySettings()
    http: HttpSettings = HttpSettings()

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from SMILY_* variables (os.environ by default), then `overrides`
        by field name (`gateway_port=0`)."""
        env = os.environ if environ is None else environ
        values = {}
        for name, f in FIELDS.items():
            raw = env.get(variable(name))
            if name in FROM_FILE and file_variable(name) in env:
                if raw is not None:
                    raise ConfigError(f"{variable(name)} and {file_variable(name)} are both set: set one")
                raw = _read_file(file_variable(name), env[file_variable(name)])
            if raw is not None:
                values[name] = _parse(f, raw)
        return cls().replace(**values, **overrides)

    def replace(self, **changes: Any) -> Settings:
        """A copy with fields changed by name, whatever their group: `s.replace(redis_url=u)`."""
        unknown = sorted(set(changes) - set(FIELDS))
        if unknown:
            raise TypeError(f"not a setting: {', '.join(unknown)}")
        by_group: dict[str, dict[str, Any]] = {}
        for name, value in changes.items():
            by_group.setdefault(GROUP_OF[name], {})[name] = value
        return dataclasses.replace(
            self, **{g: dataclasses.replace(getattr(self, g), **kw) for g, kw in by_group.items()}
        )

    def port_of(self, service: str) -> int:
        """The gRPC or HTTP port of `service` ("gateway", "tiler", ..., "http")."""
        return int(getattr(getattr(self, service), f"{service}_port"))


def variable(name: str) -> str:
    """The environment variable of a field: `redis_url` -> SMILY_REDIS_URL."""
    return "SMILY_" + name.upper()


def file_variable(name: str) -> str:
    """The variable naming a file that holds a field's value: `redis_password` -> SMILY_REDIS_PASSWORD_FILE."""
    return variable(name) + "_FILE"


def _read_file(var: str, path: str) -> str:
    # The message names the variable and the path, never what the file holds.
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ConfigError(f"{var}={path!r}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    try:
        return data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ConfigError(f"{var}={path!r}: not UTF-8 text") from None


def _kind(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def _groups() -> tuple[dict[str, str], dict[str, dataclasses.Field]]:
    group_of: dict[str, str] = {}
    fields: dict[str, dataclasses.Field] = {}
    for g in dataclasses.fields(Settings):
        for f in dataclasses.fields(g.default):  # type: ignore[arg-type]
            if f.name in group_of:
                raise TypeError(f"setting {f.name} is in both {group_of[f.name]} and {g.name}")
            group_of[f.name], fields[f.name] = g.name, f
    return group_of, fields


# Field name -> its group ("redis_url" -> "gateway"), and its dataclass field.
GROUP_OF, FIELDS = _groups()

# String settings SMILY_<FIELD>_FILE may set, except paths (`*_file`) and those with a
# `<field>_file` setting of their own, whose SMILY_<FIELD>_FILE already names that one.
FROM_FILE = frozenset(
    n for n, f in FIELDS.items() if _kind(f) == "str" and not n.endswith("_file") and f"{n}_file" not in FIELDS
)

# Lists of network addresses or numbers cannot use ":".
_SEPARATORS = {
    "index_targets": ",",
    "model_embedder_targets": ",",
    "tls_backend_clients": ",",
    "tls_index_clients": ",",
    "tls_tiler_clients": ",",
    "dicomweb_url": ",",
    "tile_mpps": ",",
    "query_transforms": ",",
    "slide_search_keys": ",",
    "http_trusted_proxies": ",",
}

_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _parse(f: dataclasses.Field, raw: str) -> Any:
    kind = _kind(f)
    try:
        if kind.startswith("tuple"):
            parts = tuple(p.strip() for p in raw.split(_SEPARATORS.get(f.name, os.pathsep)) if p.strip())
            return tuple(float(p) for p in parts) if "float" in kind else parts
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            value = raw.strip().lower()
            if not value:  # set but empty: as if unset
                return False
            if value not in _BOOLEANS:
                raise ValueError(f"not a boolean; use one of {', '.join(_BOOLEANS)}")
            return _BOOLEANS[value]
    except ValueError as exc:
        raise ConfigError(f"{variable(f.name)}={raw!r}: {exc}") from None
    return raw
