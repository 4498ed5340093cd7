"""Client channels to the internal services.

Round-robin over every address a name resolves to (a headless Service in
Kubernetes resolves to all pods), and retries of UNAVAILABLE only: every
internal RPC is idempotent.
"""
from __future__ import annotations

import json

import grpc

from . import tracing
from .server import MAX_MESSAGE_BYTES

_SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{}],
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


def channel(target: str) -> grpc.Channel:
    return tracing.intercept(grpc.insecure_channel(
        target,
        options=[
            ("grpc.service_config", _SERVICE_CONFIG),
            ("grpc.enable_retries", 1),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            # Fail fast when a backend is gone instead of waiting minutes.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ],
    ))
