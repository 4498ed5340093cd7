"""The audit trail: one FHIR AuditEvent (IHE BALP shape) per gateway RPC, as a JSON line.

Records go to their own sink, apart from the service logs (stderr): a file
(SMILY_AUDIT_LOG, reopened when rotated away) or stdout, under the logger
name `smily.audit`. A record that cannot be written raises, so the caller
can refuse to serve the call unrecorded. Entities are opaque slide ids and
the case ids found in slide metadata; slide paths never appear.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import logging.handlers
import os
import socket
import sys
import threading

import grpc

from smily.common import rpcmeta

_ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
_SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"

TENANT_EXTENSION = "urn:smily:tenant"
# Anything outside the gateway's service (reflection, say).
ACTIVITY = (rpcmeta.DCM, "110100", "Application Activity")

_SERVICE = "/smily.gateway.v1.GatewayService/"
# method -> (event type, FHIR action: C create, R read, U update, D delete, E execute/search):
# (smily.options.v1.audit_event) in gateway.proto.
EVENTS = rpcmeta.EVENTS
_WRITES = {"C", "U", "D"}
_CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
}


class _RaisingMixin:
    def handleError(self, record):
        # logging calls this inside its `except`: re-raise, an unwritten record must fail the call.
        raise  # noqa: PLE0704


class _FileHandler(_RaisingMixin, logging.handlers.WatchedFileHandler):
    pass


class _StdoutHandler(_RaisingMixin, logging.Handler):
    """stdout looked up per record (it may be replaced, e.g. under test capture)."""

    def emit(self, record):
        sys.stdout.write(self.format(record) + "\n")
        sys.stdout.flush()


_handlers: dict[str, logging.Handler] = {}
_handlers_lock = threading.Lock()


def _handler(path: str) -> logging.Handler:
    """One handler per sink per process, however many gateways run in it."""
    with _handlers_lock:
        if path not in _handlers:
            if path:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
                _handlers[path] = _FileHandler(path, encoding="utf-8")
            else:
                _handlers[path] = _StdoutHandler()
        return _handlers[path]


class AuditLog:
    def __init__(self, path: str):
        self._handler = _handler(path)

    def check(self) -> None:
        """Raise when the sink cannot take a record now (checked before a call runs)."""
        handler = self._handler
        if isinstance(handler, logging.handlers.WatchedFileHandler) and handler.lock is not None:
            with handler.lock:
                handler.reopenIfNeeded()

    def write(self, event: dict) -> None:
        record = logging.LogRecord(
            "smily.audit", logging.INFO, __file__, 0, json.dumps(event, separators=(",", ":")), None, None
        )
        self._handler.handle(record)


def _address(peer: str) -> str:
    """'ipv4:10.0.0.1:5555' -> '10.0.0.1'; 'ipv6:[::1]:5555' -> '::1'."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer


def forwarded_for(metadata) -> str | None:
    """The client address an HTTP front end put in x-forwarded-for (the first hop), if it is an address."""
    for key, value in metadata:
        if key == "x-forwarded-for":
            first = value.split(",")[0].strip()
            try:
                return str(ipaddress.ip_address(first))
            except ValueError:
                return "unparseable"
    return None


class _Entities:
    """Slide ids and case ids in messages, by what the call did with them."""

    def __init__(self, case_key: str):
        self._case_key = case_key
        self.items: dict[tuple[str, str, str], None] = {}

    def add(self, message, use: str) -> None:
        if message is None:
            return
        for field, value in message.ListFields():
            name = field.name
            if field.type == field.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
                if name in ("metadata", "filters") and self._case_key in value:
                    self.items[("case", value[self._case_key], use)] = None
            elif field.type == field.TYPE_MESSAGE:
                for m in value if field.is_repeated else [value]:
                    self.add(m, use)
            elif name in ("slide_id", "slide_ids", "exclude_slide_ids"):
                for v in value if field.is_repeated else [value]:
                    if v:
                        self.items[("slide", v, use)] = None

    def fhir(self) -> list[dict]:
        out = []
        for kind, value, use in self.items:
            slide = kind == "slide"
            out.append(
                {
                    "what": {"identifier": {"system": f"urn:smily:{kind}", "value": value}},
                    "type": {
                        "system": _ENTITY_TYPE,
                        "code": "2" if slide else "1",
                        "display": "System Object" if slide else "Person",
                    },
                    "role": {
                        "system": _OBJECT_ROLE,
                        "code": "4" if slide else "1",
                        "display": "Domain Resource" if slide else "Patient",
                    },
                    "description": use,
                }
            )
        return out


def outcome(code: grpc.StatusCode) -> str:
    """FHIR AuditEvent.outcome: 0 success, 4 minor failure (the caller's), 8 serious failure (ours)."""
    if code == grpc.StatusCode.OK:
        return "0"
    return "4" if code in _CLIENT_ERRORS else "8"


_OBSERVER = socket.gethostname()


def event(
    *,
    request_id: str,
    method: str,
    code: grpc.StatusCode,
    subject: str,
    issuer: str,
    peer: str,
    tenant: str = "",
    forwarded: str | None,
    request,
    response,
    case_key: str,
    recorded: datetime.datetime,
) -> dict:
    name = method.rsplit("/", 1)[-1]
    (system, type_code, display), action = (
        EVENTS.get(name, (ACTIVITY, "E")) if method.startswith(_SERVICE) else (ACTIVITY, "E")
    )
    entities = _Entities(case_key)
    entities.add(request, "written" if action in _WRITES else "read")
    entities.add(response, "returned")
    direct = _address(peer)
    agents = [
        {
            "who": {"identifier": {"system": issuer or "urn:smily:anonymous", "value": subject}},
            "requestor": True,
            "network": {"address": forwarded or direct, "type": "2"},
        }
    ]
    if forwarded:  # the HTTP front end that relayed the call
        agents.append(
            {"who": {"display": "forwarding proxy"}, "requestor": False, "network": {"address": direct, "type": "2"}}
        )
    return {
        "resourceType": "AuditEvent",
        "id": request_id,
        # The caller's tenant (issue 24); "" when the call was refused before a token named one.
        "extension": [{"url": TENANT_EXTENSION, "valueString": tenant}],
        "type": {"system": system, "code": type_code, "display": display},
        "subtype": [{"system": "urn:smily:rpc", "code": method, "display": name}],
        "action": action,
        "recorded": recorded.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "outcome": outcome(code),
        "outcomeDesc": code.name,
        "agent": agents,
        "source": {
            "observer": {"display": _OBSERVER},
            "type": [{"system": _SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
        "entity": entities.fhir(),
    }
