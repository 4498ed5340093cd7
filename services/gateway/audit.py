"""The audit trail: one FHIR AuditEvent (IHE BALP shape) per gateway RPC, as a JSON line.

Records go to their own sink, apart from the service logs (stderr): a file
(SMILY_AUDIT_LOG, reopened when rotated away) or stdout. A record that cannot
be written raises, so the caller can refuse to serve the call unrecorded. A
write RPC is recorded twice: durably as attempted before it acts (id
`<request id>.attempt`, no outcome yet), then with its outcome. Entities are
opaque slide ids and the case ids found in slide metadata; slide paths never
appear.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import os
import socket
import stat
import sys
import threading

import grpc

from smily.common import rpcmeta

_ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
_SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"

TENANT_EXTENSION = "urn:smily:tenant"
# The tenants a call crosses (MoveSlide's from_tenant and to_tenant), beside the caller's own.
CROSSED_TENANTS = {"from_tenant": "urn:smily:tenant:from", "to_tenant": "urn:smily:tenant:to"}
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


class AuditLog:
    """An append-only sink of JSON lines: a file (reopened when rotated away) or stdout.

    Each record is one os.write of a whole line (O_APPEND, no user-space
    buffer), so a record that returns was handed to the kernel; a durable one
    is also fsynced when the sink is a regular file. Any failure raises: the
    caller refuses to act, or to answer, unrecorded.
    """

    def __init__(self, path: str):
        self._path = path
        self._lock = threading.Lock()
        self._fd = -1
        self._id: tuple[int, int] | None = None
        if path:
            with self._lock:
                self._reopen_if_needed()

    def _reopen_if_needed(self) -> None:
        try:
            st = os.stat(self._path)
            current: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            current = None  # rotated away: start a new file
        if self._fd >= 0 and current == self._id:
            return
        if self._fd >= 0:
            os.close(self._fd)
            self._fd, self._id = -1, None
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        st = os.fstat(self._fd)
        self._id, self._regular = (st.st_dev, st.st_ino), stat.S_ISREG(st.st_mode)

    def check(self) -> None:
        """Raise when the sink cannot be opened now (checked before a call runs)."""
        if self._path:
            with self._lock:
                self._reopen_if_needed()

    def write(self, event: dict, durable: bool = False) -> None:
        line = (json.dumps(event, separators=(",", ":")) + "\n").encode()
        if not self._path:
            sys.stdout.write(line.decode())
            sys.stdout.flush()
            return
        with self._lock:
            self._reopen_if_needed()
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view) :]
            if durable and self._regular:
                os.fsync(self._fd)


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


def _agents(subject: str, issuer: str, peer: str, forwarded: str | None) -> list[dict]:
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
    return agents


def _kind(method: str) -> tuple[tuple[str, str, str], str]:
    name = method.rsplit("/", 1)[-1]
    return EVENTS.get(name, (ACTIVITY, "E")) if method.startswith(_SERVICE) else (ACTIVITY, "E")


def is_write(method: str) -> bool:
    """Whether the RPC changes state (recorded as attempted before it acts)."""
    return _kind(method)[1] in _WRITES


def _when(t: datetime.datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
    attempt: bool = False,
) -> dict:
    """The call's record; attempt=True: the record written before a write acts (no outcome yet)."""
    name = method.rsplit("/", 1)[-1]
    (system, type_code, display), action = _kind(method)
    entities = _Entities(case_key)
    entities.add(request, "written" if action in _WRITES else "read")
    entities.add(response, "returned")
    result = {"outcomeDesc": "ATTEMPTED"} if attempt else {"outcome": outcome(code), "outcomeDesc": code.name}
    return {
        "resourceType": "AuditEvent",
        "id": f"{request_id}.attempt" if attempt else request_id,
        # The caller's tenant (issue 24); "" when the call was refused before a token named one.
        "extension": [{"url": TENANT_EXTENSION, "valueString": tenant}, *_crossed(request)],
        "type": {"system": system, "code": type_code, "display": display},
        "subtype": [{"system": "urn:smily:rpc", "code": method, "display": name}],
        "action": action,
        "recorded": _when(recorded),
        **result,
        "agent": _agents(subject, issuer, peer, forwarded),
        "source": {
            "observer": {"display": _OBSERVER},
            "type": [{"system": _SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
        "entity": entities.fhir(),
    }


def _crossed(request) -> list[dict]:
    """An extension per tenant the request names as moved from or to (issue 24: the operator's calls)."""
    if request is None:
        return []
    named = {f.name: v for f, v in request.ListFields()}
    return [{"url": url, "valueString": named[f]} for f, url in CROSSED_TENANTS.items() if f in named]


def session_event(
    *,
    session: str,
    subject: str,
    issuer: str,
    peer: str,
    forwarded: str | None,
    slide_id: str,
    reads: int,
    box: tuple[int, int, int, int],
    started: datetime.datetime,
) -> dict:
    """The record of a view session: the reads of one slide it covered and their bounding region."""
    (system, type_code, display), action = EVENTS["ReadRegion"]
    return {
        "resourceType": "AuditEvent",
        "id": "session." + hashlib.sha256(session.encode()).hexdigest()[:32],
        "type": {"system": system, "code": type_code, "display": display},
        "subtype": [{"system": "urn:smily:rpc", "code": _SERVICE + "ReadRegion", "display": "ViewSession"}],
        "action": action,
        "period": {"start": _when(started), "end": _when(datetime.datetime.now(datetime.timezone.utc))},
        "recorded": _when(datetime.datetime.now(datetime.timezone.utc)),
        "outcome": "0",
        "outcomeDesc": "OK",
        "agent": _agents(subject, issuer, peer, forwarded),
        "source": {
            "observer": {"display": _OBSERVER},
            "type": [{"system": _SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
        "entity": [
            {
                "what": {"identifier": {"system": "urn:smily:slide", "value": slide_id}},
                "type": {"system": _ENTITY_TYPE, "code": "2", "display": "System Object"},
                "role": {"system": _OBJECT_ROLE, "code": "4", "display": "Domain Resource"},
                "description": "viewed",
                "detail": [
                    {"type": "reads", "valueString": str(reads)},
                    {"type": "boundingRegion", "valueString": ",".join(str(v) for v in box)},
                ],
            }
        ],
    }
