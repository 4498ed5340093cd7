"""Client channels to the internal services.

Round-robin over every address a name resolves to (a headless Service in
Kubernetes resolves to all pods), and retries of UNAVAILABLE for idempotent
methods only: a retried call whose first reply was lost must not do its work
twice or answer differently (DeleteSlide would say NOT_FOUND).
"""
from __future__ import annotations

import json

import grpc

from . import tracing
from .server import MAX_MESSAGE_BYTES

# Methods that may run twice with the same effect and answer. CommitSlide is
# idempotent since issue 15 (committing the same generation twice succeeds).
IDEMPOTENT = {
    "smily.tiler.v1.TilerService": ("GetSlideInfo", "StreamTiles", "ReadRegion"),
    "smily.embedder.v1.EmbedderService": ("Embed", "GetModelInfo"),
    "smily.index.v1.IndexService": ("AddTiles", "CommitSlide", "Search", "GetSlide", "ListSlides", "GetIndexInfo",
                                    "PutConcept", "GetConcept", "ListConcepts"),
    # The public API, for smily.client.
    "smily.gateway.v1.GatewayService": ("GetOperation", "CancelOperation", "Search", "SearchSlides", "ReadRegion",
                                        "ListConcepts", "ListSlides"),
}

_SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{"service": service, "method": m} for service, methods in IDEMPOTENT.items() for m in methods],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)


def channel(target: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    """A channel to target: TLS with credentials (tls.channel_credentials), else plaintext."""
    options = [
        ("grpc.service_config", _SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # Fail fast when a backend is gone instead of waiting minutes.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    if credentials is None:
        return tracing.intercept(grpc.insecure_channel(target, options=options))
    return tracing.intercept(grpc.secure_channel(target, credentials, options=options))
