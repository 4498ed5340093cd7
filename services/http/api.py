"""HTTP handlers: JSON (protobuf's JSON mapping) or multipart in, JSON out.

A request becomes the RPC's request message: path fields, then the JSON body
(POST) or the query parameters (GET, DELETE). A POST body is application/json
(nested at most MAX_JSON_DEPTH deep); multipart/form-data only on the routes
whose request has a bytes field (`image`), which carry the JSON in a part
named `request` and the raw bytes in a part named after the field. Anything
else is 415, so a cross-site form cannot post to the API. Every error is
{code, message} with the HTTP status of the gRPC code.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re

import grpc
from google.api import httpbody_pb2
from google.protobuf import descriptor, json_format
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from smily.common import viewsession

from .rpc import HTTP_STATUS, Gateway, Method, path_fields

log = logging.getLogger("smily.http")

# Headers passed on to the gateway as gRPC metadata: the caller's bearer token
# (the gateway authenticates, authorises and audits) and the view session this
# front end minted (the gateway verifies it, or records each read on its own).
FORWARDED_HEADERS = ("authorization", viewsession.HEADER)
# Deepest JSON body accepted (the API's messages nest a few levels).
MAX_JSON_DEPTH = 32
# Transport errors of the gRPC client name the address they failed to reach.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_ADDRESS = re.compile(r"\b(?:ipv4|ipv6|unix|dns):|\d{1,3}(?:\.\d{1,3}){3}|\[[0-9a-fA-F:]+\]")


class BadRequest(Exception):
    """The HTTP request cannot become an RPC request (INVALID_ARGUMENT)."""

    status = 400


class UnsupportedMediaType(BadRequest):
    status = 415


def error(code: grpc.StatusCode, message: str, status: int | None = None) -> JSONResponse:
    return JSONResponse({"code": code.name, "message": message}, status_code=status or HTTP_STATUS[code])


def rpc_error(exc: grpc.RpcError) -> JSONResponse:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    if code == grpc.StatusCode.UNKNOWN:
        # The gateway never answers UNKNOWN itself; it means it could not be reached cleanly.
        code = grpc.StatusCode.UNAVAILABLE
    details = exc.details() or ""
    if not details or _ADDRESS.search(details):
        # Not the gateway's own message but the channel's: name the backend, never its address.
        details = f"gateway: {code.name}"
    return error(code, details)


def trusted_networks(cidrs) -> tuple:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def _ip(text: str):
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None


def client_address(request: Request, trusted: tuple) -> str:
    """Who sent the request: the peer, unless the peer is a trusted proxy; then the rightmost
    X-Forwarded-For entry that is not a trusted proxy (entries left of it are the client's to forge)."""
    peer = request.client.host if request.client else ""
    address = _ip(peer)
    if address is None or not any(address in net for net in trusted):
        return peer
    hops = [h for v in request.headers.getlist("x-forwarded-for") for h in v.split(",") if h.strip()]
    for hop in reversed(hops):
        address = _ip(hop)
        if address is None:
            return "unparseable"
        if not any(address in net for net in trusted):
            return str(address)
    return str(_ip(hops[0])) if hops else peer


def metadata(request: Request) -> list[tuple[str, str]]:
    out = [(h, request.headers[h]) for h in FORWARDED_HEADERS if h in request.headers]
    # The gateway's audit names the client, not this proxy.
    client = client_address(request, request.app.state.trusted_proxies)
    if client:
        out.append(("x-forwarded-for", client))
    return out


def _query_value(field: descriptor.FieldDescriptor, raw: str):
    if field.type == descriptor.FieldDescriptor.TYPE_BOOL:
        if raw.lower() not in ("true", "false", "1", "0"):
            raise BadRequest(f"{field.json_name} takes true or false, got {raw!r}")
        return raw.lower() in ("true", "1")
    return raw


def _from_query(method: Method, request: Request) -> dict:
    fields = {f.name: f for f in method.input.fields} | {f.json_name: f for f in method.input.fields}
    out: dict = {}
    for key, raw in request.query_params.multi_items():
        field = fields.get(key)
        if field is None:
            raise BadRequest(f"unknown query parameter {key!r}")
        value = _query_value(field, raw)
        if field.is_repeated:
            out.setdefault(field.name, []).append(value)
        else:
            out[field.name] = value
    return out


def multipart_fields(method: Method) -> dict[str, descriptor.FieldDescriptor]:
    """The bytes fields a multipart upload may carry (none: the route takes JSON only)."""
    fields = {
        f.name: f for f in method.input.fields if f.type == descriptor.FieldDescriptor.TYPE_BYTES and not f.is_repeated
    }
    return fields | {f.json_name: f for f in fields.values()}


async def _from_body(method: Method, request: Request) -> tuple[dict, dict[str, bytes]]:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    bytes_fields = multipart_fields(method)
    if kind == "multipart/form-data" and bytes_fields:
        files: dict[str, bytes] = {}
        doc: dict = {}
        async with request.form() as form:
            for key, value in form.multi_items():
                if key == "request":
                    doc = _json(value if isinstance(value, str) else (await value.read()).decode())
                elif key in bytes_fields and not isinstance(value, str):
                    files[bytes_fields[key].name] = await value.read()
                else:
                    raise BadRequest(f"unexpected multipart part {key!r}: send `request` (JSON) and bytes fields")
        return doc, files
    if not kind and not (await request.body()):
        return {}, {}  # an empty POST (`:cancel`) carries nothing to misread
    if kind != "application/json":
        allowed = "application/json or multipart/form-data" if bytes_fields else "application/json"
        raise UnsupportedMediaType(f"send {allowed}, not {kind or 'no content type'}")
    raw = await request.body()
    if not raw.strip():
        return {}, {}
    return _json(raw), {}


def _depth(text: str) -> int:
    """How deep the JSON's arrays and objects nest (strings skipped), without parsing it."""
    depth = deepest = 0
    for bracket in re.findall(r"[\[\]{}]", _STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _json(raw) -> dict:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    if _depth(text) > MAX_JSON_DEPTH:
        raise BadRequest(f"the body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest("the body must be a JSON object")
    return doc


async def parse(method: Method, request: Request):
    """The RPC request message for this HTTP request."""
    if method.rule.body:
        doc, files = await _from_body(method, request)
        if request.query_params:
            raise BadRequest("this call takes a JSON body, not query parameters")
    else:
        doc, files = _from_query(method, request), {}
    for name in path_fields(method.rule):
        doc[name] = request.path_params[name]
    message = method.new_request()
    try:
        json_format.ParseDict(doc, message)
    except json_format.ParseError as exc:
        raise BadRequest(str(exc)) from None
    for name, data in files.items():
        # A part must not silently replace what the JSON set in its oneof (an image part
        # would clear the JSON's region, and the error would then name the wrong field).
        oneof = message.DESCRIPTOR.fields_by_name[name].containing_oneof
        if oneof is not None and message.WhichOneof(oneof.name) is not None:
            raise BadRequest(
                f"at most one of {', '.join(f.json_name for f in oneof.fields)}: {name} came as a part too"
            )
        setattr(message, name, data)
    return message


def to_json(message) -> dict:
    # Every field, zero or not, so clients see a stable shape.
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def handler(method: Method, gateway: Gateway):
    async def handle(request: Request) -> Response:
        try:
            rpc_request = await parse(method, request)
        except BadRequest as exc:
            return error(grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.status)
        try:
            response = await gateway.call(method.name, rpc_request, metadata(request))
        except grpc.RpcError as exc:
            return rpc_error(exc)
        if isinstance(response, httpbody_pb2.HttpBody):  # a file (an export), sent as it is
            return Response(response.data, media_type=response.content_type)
        return JSONResponse(to_json(response))

    handle.__name__ = method.name
    return handle
