"""Settings for every service, read from SMILY_* environment variables.

One flat dataclass keeps the knobs of the whole suite in one place: a field
`foo_bar` is set by the variable `SMILY_FOO_BAR`. Lists use the OS path
separator (":" on Linux), except lists of addresses, which use ",".
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Settings:
    # Address the servers bind to; Kubernetes manifests set 0.0.0.0.
    bind_host: str = "127.0.0.1"
    gateway_port: int = 50050
    tiler_port: int = 50051
    embedder_port: int = 50052
    index_port: int = 50053
    # One Prometheus endpoint per process; 0 turns it off.
    metrics_port: int = 9100
    # Where the gateway dials its backends (dns:///name:port in Kubernetes).
    tiler_target: str = "127.0.0.1:50051"
    embedder_target: str = "127.0.0.1:50052"
    index_target: str = "127.0.0.1:50053"
    # Index shards, ","-separated (addresses hold ":"); empty = index_target alone.
    # Each slide lives on the shard its id hashes to; a target may resolve to replicas.
    index_targets: tuple[str, ...] = ()
    # Most RPCs one server runs at once; more get RESOURCE_EXHAUSTED.
    max_concurrent_rpcs: int = 64
    worker_threads: int = 16
    # Seconds an in-flight RPC may finish in after SIGTERM.
    shutdown_grace_s: float = 10.0
    log_level: str = "INFO"

    # Tiler: directories slides may be read from.
    slide_roots: tuple[str, ...] = field(default_factory=lambda: ("data/samples",))
    # Largest region (pixels at the output resolution) one ReadRegion returns.
    max_region_pixels: int = 4096 * 4096
    # Processes that parse slide files (isolated from the server, in parallel).
    tiler_readers: int = 2
    # Seconds one read may take before its process is killed and replaced.
    tiler_read_timeout_s: float = 60.0

    # Embedder: model repository and the model it serves, "<name>/<version>".
    model_repository: str = "models"
    model: str = "efficientnet-lite0/1"
    intra_op_threads: int = 0
    max_batch: int = 64
    # Dynamic batching: concurrent requests are coalesced up to preferred_batch
    # images or until the oldest has waited max_queue_delay_ms; 1 or 0 turns it
    # off. At most max_queue images wait; more get RESOURCE_EXHAUSTED.
    # 0 = automatic (issue 19): 32 on a GPU, off on the CPU, where a batch costs
    # per image anyway and waiting for company only adds latency.
    preferred_batch: int = 0
    max_queue_delay_ms: float = 2.0
    max_queue: int = 256
    # TensorRT only (when onnxruntime-gpu finds it): build FP16 engines.
    gpu_fp16: bool = False

    # Index: where vectors and records live.
    index_dir: str = "var/index"
    # FAISS factory string used once a collection has index_ivf_threshold tiles;
    # empty = automatic (IVF{sqrt n},PQ{m}); "Flat" = always exact.
    index_factory: str = ""
    index_ivf_threshold: int = 200_000
    index_nprobe: int = 32
    # ANN candidates per hit re-scored exactly from the journal (<= 1: off).
    index_rerank: int = 100
    index_snapshot_interval_s: float = 300.0

    # Gateway.
    # redis://host:port/db; empty uses an in-process cache (one replica only).
    redis_url: str = ""
    cache_ttl_s: int = 24 * 3600
    redis_timeout_s: float = 0.05
    tile_mpp: float = 1.0
    tile_size: int = 224
    min_tissue_fraction: float = 0.5
    embed_batch: int = 32
    max_concurrent_ingests: int = 2
    # Slide metadata key naming a slide's case (patient/accession), for exclude_query_case.
    case_key: str = "case_id"
    # Deadline for a downstream call when the caller gave none.
    backend_timeout_s: float = 30.0

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> "Settings":
        env = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            raw = env.get("SMILY_" + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f, raw)
        values.update(overrides)
        return cls(**values)


# Lists of network addresses cannot use ":".
_SEPARATORS = {"index_targets": ","}


def _parse(f: dataclasses.Field, raw: str):
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind.startswith("tuple"):
            return tuple(p.strip() for p in raw.split(_SEPARATORS.get(f.name, os.pathsep)) if p.strip())
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            return raw.strip().lower() in ("1", "true", "yes", "on")
    except ValueError as exc:
        raise ValueError(f"SMILY_{f.name.upper()}={raw!r}: {exc}") from None
    return raw
