"""The OpenAPI 3.1 document of the HTTP/JSON API, made from gateway.proto's
descriptors and the route table, so it cannot drift from the proto.

`python -m smily.http.openapi > docs/openapi.json` writes the checked-in copy
(tests/test_http_api.py checks it matches what the server serves).
"""

from __future__ import annotations

import json
import sys

from google.protobuf import descriptor

from .rpc import SERVICE, methods, path_fields

FD = descriptor.FieldDescriptor
_SCALARS: dict[int, dict[str, object]] = {
    FD.TYPE_STRING: {"type": "string"},
    FD.TYPE_BOOL: {"type": "boolean"},
    FD.TYPE_BYTES: {"type": "string", "format": "byte", "description": "base64"},
    FD.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FD.TYPE_FLOAT: {"type": "number", "format": "float"},
    FD.TYPE_INT32: {"type": "integer", "format": "int32"},
    FD.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FD.TYPE_UINT32: {"type": "integer", "format": "uint32"},
    # proto3 JSON writes 64-bit integers as strings and reads either.
    FD.TYPE_INT64: {"type": ["string", "integer"], "format": "int64"},
    FD.TYPE_SINT64: {"type": ["string", "integer"], "format": "int64"},
    FD.TYPE_UINT64: {"type": ["string", "integer"], "format": "uint64"},
}
ERROR = {
    "type": "object",
    "properties": {
        "code": {"type": "string", "description": "canonical gRPC status code name, e.g. NOT_FOUND"},
        "message": {"type": "string"},
    },
    "required": ["code", "message"],
}


def _ref(d) -> dict:
    return {"$ref": f"#/components/schemas/{d.full_name}"}


def _value(field, schemas: dict) -> dict:
    if field.type == FD.TYPE_MESSAGE:
        _collect(field.message_type, schemas)
        return _ref(field.message_type)
    if field.type == FD.TYPE_ENUM:
        _collect(field.enum_type, schemas)
        return _ref(field.enum_type)
    return dict(_SCALARS[field.type])


def _field(field, schemas: dict) -> dict:
    if field.type == FD.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
        return {"type": "object", "additionalProperties": _value(field.message_type.fields_by_name["value"], schemas)}
    if field.is_repeated:
        return {"type": "array", "items": _value(field, schemas)}
    return _value(field, schemas)


def _collect(d, schemas: dict) -> None:
    if d.full_name in schemas:
        return
    if isinstance(d, descriptor.EnumDescriptor):
        schemas[d.full_name] = {"type": "string", "enum": [v.name for v in d.values]}
        return
    schemas[d.full_name] = {}  # placeholder: messages may refer to themselves
    props = {f.json_name: _field(f, schemas) for f in d.fields}
    # Leave out the synthetic oneof of each `optional` field.
    oneofs = [o for o in d.oneofs if not (len(o.fields) == 1 and o.name == "_" + o.fields[0].name)]
    doc: dict = {"type": "object", "properties": props}
    if oneofs:
        doc["description"] = "; ".join(f"at most one of {', '.join(f.json_name for f in o.fields)}" for o in oneofs)
    schemas[d.full_name] = doc


def _parameters(method) -> list[dict]:
    params = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in path_fields(method.rule)
    ]
    if not method.rule.body:
        taken = set(path_fields(method.rule))
        for f in method.input.fields:
            if f.name not in taken and f.type not in (FD.TYPE_MESSAGE, FD.TYPE_BYTES):
                params.append({"name": f.json_name, "in": "query", "required": False, "schema": _field(f, {})})
    return params


def document() -> dict:
    schemas: dict = {"Error": ERROR}
    paths: dict = {}
    for m in methods():
        _collect(m.input, schemas)
        _collect(m.output, schemas)
        op: dict = {
            "operationId": m.name,
            "summary": f"{SERVICE.full_name}.{m.name}",
            "tags": [SERVICE.name],
            "parameters": _parameters(m),
            "responses": {
                "200": {"description": "OK", "content": {"application/json": {"schema": _ref(m.output)}}},
                "default": {
                    "description": "error: the gRPC status as {code, message}",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                },
            },
        }
        if m.rule.body:
            content = {"application/json": {"schema": _ref(m.input)}}
            files = [f for f in m.input.fields if f.type == FD.TYPE_BYTES and not f.is_repeated]
            if files:
                content["multipart/form-data"] = {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "request": {"type": "string", "description": f"JSON of {m.input.full_name}"},
                            **{f.json_name: {"type": "string", "format": "binary"} for f in files},
                        },
                    }
                }
            op["requestBody"] = {"required": False, "content": content}
        paths.setdefault(m.rule.path, {})[m.rule.verb.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "SMILY HTTP/JSON API",
            "version": "v1",
            "description": (
                "Every public gateway RPC over HTTP/JSON (protobuf's JSON mapping of "
                "smily/gateway/v1/gateway.proto). Send `Authorization: Bearer <token>` "
                "when the gateway requires tokens."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
        "security": [{}, {"bearer": []}],
    }


if __name__ == "__main__":
    json.dump(document(), sys.stdout, indent=2)
    sys.stdout.write("\n")
