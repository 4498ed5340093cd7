"""HTTP handlers: JSON (protobuf's JSON mapping) or multipart in, JSON out.

A request becomes the RPC's request message: path fields, then the JSON body
(POST) or the query parameters (GET, DELETE). Multipart bodies carry the JSON
in a part named `request` and raw image bytes in parts named after top-level
bytes fields (`image`). Every error is {code, message} with the HTTP status of
the gRPC code.
"""

from __future__ import annotations

import json
import logging

import grpc
from google.api import httpbody_pb2
from google.protobuf import descriptor, json_format
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .rpc import HTTP_STATUS, Gateway, Method, path_fields

log = logging.getLogger("smily.http")

# Headers passed on to the gateway as gRPC metadata: the caller's bearer token
# (the gateway authenticates, authorises and audits) and the viewer's session
# id, by which the gateway's audit records a viewed slide once per session.
FORWARDED_HEADERS = ("authorization", "x-smily-view-session")


class BadRequest(Exception):
    """The HTTP request cannot become an RPC request (INVALID_ARGUMENT)."""


def error(code: grpc.StatusCode, message: str, status: int | None = None) -> JSONResponse:
    return JSONResponse({"code": code.name, "message": message}, status_code=status or HTTP_STATUS[code])


def rpc_error(exc: grpc.RpcError) -> JSONResponse:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    if code == grpc.StatusCode.UNKNOWN:
        # The gateway never answers UNKNOWN itself; it means it could not be reached cleanly.
        code = grpc.StatusCode.UNAVAILABLE
    return error(code, exc.details() or code.name)


def metadata(request: Request) -> list[tuple[str, str]]:
    out = [(h, request.headers[h]) for h in FORWARDED_HEADERS if h in request.headers]
    # The gateway's audit names the client, not this proxy: append it as any proxy does.
    client = request.client.host if request.client else ""
    prior = request.headers.get("x-forwarded-for", "")
    chain = ", ".join(p for p in (prior, client) if p)
    if chain:
        out.append(("x-forwarded-for", chain))
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


async def _from_body(method: Method, request: Request) -> tuple[dict, dict[str, bytes]]:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        files: dict[str, bytes] = {}
        doc: dict = {}
        bytes_fields = {f.name: f for f in method.input.fields if f.type == descriptor.FieldDescriptor.TYPE_BYTES}
        bytes_fields |= {f.json_name: f for f in bytes_fields.values()}
        async with request.form() as form:
            for key, value in form.multi_items():
                if key == "request":
                    doc = _json(value if isinstance(value, str) else (await value.read()).decode())
                elif key in bytes_fields and not isinstance(value, str):
                    files[bytes_fields[key].name] = await value.read()
                else:
                    raise BadRequest(f"unexpected multipart part {key!r}: send `request` (JSON) and bytes fields")
        return doc, files
    raw = await request.body()
    if not raw.strip():
        return {}, {}
    if kind not in ("application/json", ""):
        raise BadRequest(f"send application/json or multipart/form-data, not {kind}")
    return _json(raw), {}


def _json(raw) -> dict:
    try:
        doc = json.loads(raw)
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
            return error(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            response = await gateway.call(method.name, rpc_request, metadata(request))
        except grpc.RpcError as exc:
            return rpc_error(exc)
        if isinstance(response, httpbody_pb2.HttpBody):  # a file (an export), sent as it is
            return Response(response.data, media_type=response.content_type)
        return JSONResponse(to_json(response))

    handle.__name__ = method.name
    return handle
