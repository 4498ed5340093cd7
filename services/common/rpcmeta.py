"""What each RPC's proto says about it, read from the descriptors at import.

An RPC's retry safety (protobuf's `idempotency_level`), who may call it
(`smily.options.v1.role`), how it is audited (`smily.options.v1.audit_event`),
which of its errors are the caller's (`smily.options.v1.caller_input`) and its
HTTP route (`google.api.http`) are declared once, next to it in its .proto.
Importing this module checks that every RPC declares what it must, so a
server with an incomplete contract does not start (and `make check` fails:
`python -m smily.common.rpcmeta`).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor, descriptor_pb2

from smily.embedder.v1 import embedder_pb2
from smily.gateway.v1 import gateway_pb2
from smily.index.v1 import index_pb2
from smily.options.v1 import options_pb2
from smily.tiler.v1 import tiler_pb2

GATEWAY = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"]
BACKENDS = {
    "tiler": tiler_pb2.DESCRIPTOR.services_by_name["TilerService"],
    "embedder": embedder_pb2.DESCRIPTOR.services_by_name["EmbedderService"],
    "index": index_pb2.DESCRIPTOR.services_by_name["IndexService"],
}
SERVICES = (GATEWAY, *BACKENDS.values())

_M = descriptor_pb2.MethodOptions
ADMIN = "smily.admin"
# DICOM audit event types (code system DCM) by the code that numbers them in options.proto.
DCM = "http://dicom.nema.org/resources/ontology/DCM"
_DISPLAY = {
    options_pb2.AUDIT_EVENT_TYPE_APPLICATION_ACTIVITY: "Application Activity",
    options_pb2.AUDIT_EVENT_TYPE_INSTANCES_ACCESSED: "DICOM Instances Accessed",
    options_pb2.AUDIT_EVENT_TYPE_IMPORT: "Import",
    options_pb2.AUDIT_EVENT_TYPE_QUERY: "Query",
}
# FHIR AuditEvent.action codes.
_ACTION = {
    options_pb2.AUDIT_ACTION_CREATE: "C",
    options_pb2.AUDIT_ACTION_READ: "R",
    options_pb2.AUDIT_ACTION_UPDATE: "U",
    options_pb2.AUDIT_ACTION_DELETE: "D",
    options_pb2.AUDIT_ACTION_EXECUTE: "E",
}


_VERBS = ("get", "post", "delete", "put", "patch")


@dataclass(frozen=True)
class HttpRule:
    verb: str
    path: str  # {field} segments are request fields
    body: bool  # True: the JSON body is the request ("*"); False: query parameters


def _options(method: descriptor.MethodDescriptor) -> descriptor_pb2.MethodOptions:
    return method.GetOptions()


def _role_name(role: int) -> str:
    return "smily." + options_pb2.Role.Name(role).removeprefix("ROLE_").lower()


def problems(public=(GATEWAY,), internal=None) -> list[str]:
    """What the services' protos fail to declare; empty when every RPC is complete.
    Every RPC states its idempotency_level; a public one also its roles, audit event and route."""
    out = []
    for service in (*public, *(BACKENDS.values() if internal is None else internal)):
        for m in service.methods:
            name, opts = f"{service.full_name}/{m.name}", _options(m)
            if not opts.HasField("idempotency_level"):
                out.append(f"{name}: no idempotency_level (IDEMPOTENCY_UNKNOWN if it must not be retried)")
            if service not in public:
                continue
            roles = opts.Extensions[options_pb2.role]
            if not roles or options_pb2.ROLE_UNSPECIFIED in roles:
                out.append(f"{name}: no (smily.options.v1.role)")
            event = opts.Extensions[options_pb2.audit_event]
            if event.type not in _DISPLAY or event.action not in _ACTION:
                out.append(f"{name}: no (smily.options.v1.audit_event) with a type and an action")
            rule = opts.Extensions[annotations_pb2.http]
            if rule.WhichOneof("pattern") not in _VERBS or rule.body not in ("", "*"):
                out.append(f'{name}: no (google.api.http) route with body "*" or none')
    return out


def _retried(method: descriptor.MethodDescriptor) -> bool:
    return _options(method).idempotency_level in (_M.IDEMPOTENT, _M.NO_SIDE_EFFECTS)


def _http(rule: http_pb2.HttpRule) -> HttpRule:
    verb = rule.WhichOneof("pattern") or ""
    return HttpRule(verb.upper(), getattr(rule, verb), rule.body == "*")


def path_fields(rule: HttpRule) -> list[str]:
    return re.findall(r"{(\w+)}", rule.path)


_missing = problems()
if _missing:
    raise ImportError("incomplete RPC contract in the protos:\n  " + "\n  ".join(_missing))

# Service full name -> methods that may run twice with the same effect and answer (retried on UNAVAILABLE).
IDEMPOTENT: dict[str, tuple[str, ...]] = {
    s.full_name: tuple(m.name for m in s.methods if _retried(m)) for s in SERVICES
}
# Gateway method path -> the roles that may call it (admin always may).
ROLES: dict[str, frozenset[str]] = {
    f"/{GATEWAY.full_name}/{m.name}": frozenset(map(_role_name, _options(m).Extensions[options_pb2.role]))
    for m in GATEWAY.methods
}
# Gateway method name -> ((system, code, display), FHIR action).
EVENTS: dict[str, tuple[tuple[str, str, str], str]] = {
    m.name: (
        (DCM, str(ev.type), _DISPLAY[ev.type]),
        _ACTION[ev.action],
    )
    for m in GATEWAY.methods
    for ev in [_options(m).Extensions[options_pb2.audit_event]]
}
# Backend name -> methods whose INVALID_ARGUMENT is about what the caller sent.
CALLER_INPUT: dict[str, frozenset[str]] = {
    backend: frozenset(m.name for m in s.methods if _options(m).Extensions[options_pb2.caller_input])
    for backend, s in BACKENDS.items()
}
# Gateway method name -> its HTTP route.
RULES: dict[str, HttpRule] = {m.name: _http(_options(m).Extensions[annotations_pb2.http]) for m in GATEWAY.methods}


if __name__ == "__main__":  # `make check`: the import above already failed on a missing option
    print(f"rpcmeta: {sum(len(s.methods) for s in SERVICES)} RPCs declare their options", file=sys.stderr)
