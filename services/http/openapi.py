"""The OpenAPI 3.1 document of the HTTP/JSON API, made from gateway.proto's
descriptors and routes, so it cannot drift from the proto, and from the bounds
the gateway checks (smily.common.limits), so a request it declares valid is
one the gateway accepts (tests/test_openapi_fuzz.py runs schemathesis on it).

Request strings are declared with conservative patterns (printable ASCII,
plain relative paths): the gateway accepts more (any printable text), which
JSON Schema cannot say exactly. Unknown body fields are refused.

`python -m smily.http.openapi > docs/openapi.json` writes the checked-in copy
(tests/test_http_api.py checks it matches what the server serves).
"""

from __future__ import annotations

import json
import sys

from google.protobuf import descriptor

from smily.common import limits

from .rpc import SERVICE, methods, path_fields

FD = descriptor.FieldDescriptor
_SCALARS: dict[int, dict[str, object]] = {
    FD.TYPE_STRING: {"type": "string"},
    FD.TYPE_BOOL: {"type": "boolean"},
    FD.TYPE_BYTES: {"type": "string", "format": "byte", "description": "base64"},
    FD.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FD.TYPE_FLOAT: {"type": "number", "format": "float"},
    FD.TYPE_INT32: {"type": "integer", "format": "int32", "minimum": -(2**31), "maximum": 2**31 - 1},
    FD.TYPE_SINT32: {"type": "integer", "format": "int32", "minimum": -(2**31), "maximum": 2**31 - 1},
    FD.TYPE_UINT32: {"type": "integer", "format": "uint32", "minimum": 0, "maximum": 2**32 - 1},
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


_G = "smily.gateway.v1."
_PRINTABLE = "^[ -~]*$"
_TEXT = {"type": "string", "pattern": _PRINTABLE}
# A slide id: printable, no path syntax, no outer spaces (limits.slide_id).
_SLIDE_ID = {
    "type": "string",
    "pattern": f"^[A-Za-z0-9_-][A-Za-z0-9._ -]{{0,{limits.MAX_ID_CHARS - 2}}}[A-Za-z0-9._-]$|^[A-Za-z0-9_-]$",
}
_SLIDE_IDS = {"type": "array", "items": _SLIDE_ID, "maxItems": limits.MAX_SLIDE_IDS}
# A path under the slide roots: relative, no '..', no escapes.
_SOURCE = {
    "type": "string",
    "maxLength": limits.MAX_SOURCE_CHARS,
    "pattern": "^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$",
}
_KEY = {"type": "string", "minLength": 1, "maxLength": limits.MAX_KEY_CHARS, "pattern": _PRINTABLE}
# 64 keys of 128 characters and values of 128 stay within limits.MAX_METADATA_BYTES (values may be longer
# when the whole stays within it).
_METADATA = {
    "type": "object",
    "maxProperties": limits.MAX_METADATA_KEYS,
    "propertyNames": _KEY,
    "additionalProperties": {"type": "string", "maxLength": 128, "pattern": _PRINTABLE},
}
_FILTERS = {
    "type": "object",
    "maxProperties": limits.MAX_FILTERS,
    "propertyNames": _KEY,
    "additionalProperties": {"type": "string", "maxLength": limits.MAX_VALUE_CHARS, "pattern": _PRINTABLE},
}
_TOKEN = {"type": "string", "maxLength": limits.MAX_TOKEN_CHARS, "pattern": _PRINTABLE}
_PAGE_TOKEN = {**_TOKEN, "format": "page-token", "description": "the nextPageToken of the previous page"}
_TENANT = {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"}
_CONCEPT_NAME = {"type": "string", "pattern": f"^{limits.CONCEPT_NAME.pattern}$"}
_MODEL_ID = {"type": "string", "pattern": f"^{limits.MODEL_ID.pattern}$"}
# 0 (the file's own) or a plausible scan resolution.
_MPP = {
    "anyOf": [
        {"const": 0},
        {"type": "number", "minimum": limits.MIN_SLIDE_MPP, "maximum": limits.MAX_SLIDE_MPP},
    ]
}
_EXAMPLES = {"maxItems": limits.MAX_EXAMPLES}
_POSITION = {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**53}
_SIZE = {"type": "integer", "format": "int64", "minimum": 1, "maximum": 2**53}
_IMAGE = {"type": "string", "format": "byte", "description": "base64 of PNG or JPEG bytes (1 byte to 32 MiB)"}
# Per message: JSON Schema refinements of the fields (merged over what the descriptor gives),
# and the message-level keywords (required, anyOf...).
_RULES: dict[str, tuple[dict, dict]] = {
    _G + "IngestSlideRequest": (
        {"source": _SOURCE, "slideId": _SLIDE_ID, "metadata": _METADATA, "slideMpp": _MPP},
        {"required": ["source"]},
    ),
    _G + "IngestCaseRequest": (
        {
            # limits.ACCESSION, in printable ASCII.
            "accessionNumber": {"type": "string", "pattern": "^[ -)+->@-\\[\\]-~]{1,16}$"},
            "archive": {**_TEXT, "maxLength": limits.MAX_ID_CHARS},
            "slideIds": {"type": "object", "propertyNames": _KEY, "additionalProperties": _SLIDE_ID},
            "metadata": _METADATA,
        },
        {"required": ["accessionNumber"]},
    ),
    _G + "GetOperationRequest": ({"operationId": _TOKEN}, {}),
    _G + "CancelOperationRequest": ({"operationId": _TOKEN}, {}),
    _G + "Region": (
        {
            "slideId": _SLIDE_ID,
            "x": _POSITION,
            "y": _POSITION,
            "width": _SIZE,
            "height": _SIZE,
            "polygon": {
                "anyOf": [{"maxItems": 0}, {"minItems": 3, "maxItems": limits.MAX_POLYGON_VERTICES}],
                "description": "vertices inside the bounding box x, y, width, height",
            },
            "tenant": {"type": "string", "pattern": "^$|^[A-Za-z0-9._-]{1,64}$"},
        },
        {"required": ["slideId", "width", "height"]},
    ),
    _G + "Point": ({"x": _POSITION, "y": _POSITION}, {}),
    _G + "Example": ({"image": _IMAGE}, {"anyOf": [{"required": ["image"]}, {"required": ["region"]}]}),
    _G + "WeightedConcept": (
        {
            "name": _CONCEPT_NAME,
            "weight": {"type": "number", "minimum": -limits.MAX_CONCEPT_WEIGHT, "maximum": limits.MAX_CONCEPT_WEIGHT},
        },
        {"required": ["name"]},
    ),
    _G + "SearchRequest": (
        {
            "image": _IMAGE,
            "k": {"type": "integer", "minimum": 1, "maximum": limits.MAX_K},
            "positives": _EXAMPLES,
            "negatives": _EXAMPLES,
            "negativeWeight": {"type": "number", "minimum": 0, "maximum": 1},
            "concepts": {"maxItems": limits.MAX_CONCEPTS},
            "maxHitsPerSlide": {"minimum": 0},
            "pageSize": {"minimum": 0},
            "pageToken": _PAGE_TOKEN,
            "slideIds": _SLIDE_IDS,
            "filters": _FILTERS,
            "excludeSlideIds": _SLIDE_IDS,
            "nprobe": {"minimum": 0},
            "imageMpp": _MPP,
        },
        {
            "anyOf": [
                {"required": ["image"]},
                {"required": ["region"]},
                {"required": ["positives"], "properties": {"positives": {"minItems": 1}}},
            ],
            # exclude_query_case needs a region query.
            "if": {"required": ["excludeQueryCase"], "properties": {"excludeQueryCase": {"const": True}}},
            "then": {"required": ["region"]},
        },
    ),
    _G + "SearchSlidesRequest": (
        {
            "slideId": _SLIDE_ID,
            "source": _SOURCE,
            "k": {"type": "integer", "minimum": 1, "maximum": limits.MAX_SLIDE_MATCHES},
            "mosaicSize": {"type": "integer", "minimum": 1, "maximum": limits.MAX_MOSAIC},
            "regionsPerSlide": {"type": "integer", "minimum": 0, "maximum": limits.MAX_REGIONS},
            "slideMpp": _MPP,
        },
        {"anyOf": [{"required": ["slideId"]}, {"required": ["source"]}]},
    ),
    _G + "ReadRegionRequest": (
        {
            "mpp": {"minimum": 0},
            "maxSide": {"type": "integer", "minimum": 0, "maximum": limits.MAX_SIDE, "description": "0: 1024"},
        },
        {"required": ["region"]},
    ),
    _G + "CreateConceptRequest": (
        {
            "name": _CONCEPT_NAME,
            "withExamples": {**_EXAMPLES, "minItems": 1},
            "withoutExamples": {**_EXAMPLES, "minItems": 1},
        },
        {"required": ["name", "withExamples", "withoutExamples"]},
    ),
    _G + "DeleteConceptRequest": ({"name": _CONCEPT_NAME}, {"required": ["name"]}),
    _G + "ListSlidesRequest": (
        {
            "pageSize": {"minimum": 0},
            "pageToken": _PAGE_TOKEN,
            "metadataQuery": {**_TEXT, "maxLength": limits.MAX_METADATA_QUERY_CHARS},
            "metadataKey": {**_KEY, "description": "one of GetIndexInfo's slideSearchKeys; needs metadataQuery"},
        },
        {},
    ),
    _G + "DeleteSlideRequest": ({"slideId": _SLIDE_ID}, {"required": ["slideId"]}),
    _G + "GetSlideRequest": ({"slideId": _SLIDE_ID}, {"required": ["slideId"]}),
    _G + "MoveSlideRequest": (
        {"slideId": _SLIDE_ID, "fromTenant": _TENANT, "toTenant": _TENANT},
        {"required": ["slideId", "fromTenant", "toTenant"]},
    ),
    _G + "GetSlideHeatmapRequest": (
        {"slideId": _SLIDE_ID, "maxTiles": {"type": "integer", "minimum": 1, "maximum": limits.MAX_HEATMAP_TILES}},
        {"required": ["slideId", "search"]},
    ),
    _G + "MigrateIndexRequest": (
        {
            "modelId": _MODEL_ID,
            "maxTilesPerS": {"minimum": 0, "maximum": limits.MAX_MIGRATION_TILES_PER_S},
        },
        {"required": ["modelId"]},
    ),
    _G + "CutoverIndexRequest": ({"modelId": {"anyOf": [{"const": ""}, _MODEL_ID]}}, {}),
    _G + "DropIndexModelRequest": ({"modelId": _MODEL_ID}, {"required": ["modelId"]}),
    _G + "ExportSearchRequest": (
        {
            "searchId": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
            "format": {"type": "string", "enum": ["", "geojson"]},
            "slideId": {"anyOf": [{"const": ""}, _SLIDE_ID]},
        },
        {"required": ["searchId"]},
    ),
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
    fields, rules = _RULES.get(d.full_name, ({}, {}))
    props = {f.json_name: _refined(_field(f, schemas), fields.get(f.json_name)) for f in d.fields}
    # Leave out the synthetic oneof of each `optional` field.
    oneofs = [o for o in d.oneofs if not (len(o.fields) == 1 and o.name == "_" + o.fields[0].name)]
    doc: dict = {"type": "object", "properties": props, **rules, "additionalProperties": False}
    if oneofs:
        doc["description"] = "; ".join(f"at most one of {', '.join(f.json_name for f in o.fields)}" for o in oneofs)
        # Two members of a oneof are refused (protobuf's JSON parser).
        doc["not"] = {"anyOf": [{"required": [a.json_name, b.json_name]} for o in oneofs for a, b in _pairs(o.fields)]}
    schemas[d.full_name] = doc


def _pairs(fields) -> list:
    return [(a, b) for i, a in enumerate(fields) for b in fields[i + 1 :]]


def _refined(schema: dict, extra: dict | None) -> dict:
    """A field's schema with its rule: an array's bounds, or its value's."""
    if not extra:
        return schema
    if schema.get("type") == "array" and "items" not in extra:
        return {**schema, **extra}
    if "$ref" in schema:
        return {"allOf": [schema], **extra}
    if "anyOf" in extra or extra.get("type") == "object":
        return extra
    return {**schema, **extra}


def _parameters(method) -> list[dict]:
    fields = {f.name: f for f in method.input.fields}
    rules = _RULES.get(method.input.full_name, ({}, {}))[0]

    def schema(name: str) -> dict:
        return _refined(_field(fields[name], {}), rules.get(fields[name].json_name))

    params = [
        {"name": name, "in": "path", "required": True, "schema": schema(name)} for name in path_fields(method.rule)
    ]
    if not method.rule.body:
        taken = set(path_fields(method.rule))
        for f in method.input.fields:
            if f.name not in taken and f.type not in (FD.TYPE_MESSAGE, FD.TYPE_BYTES):
                params.append({"name": f.json_name, "in": "query", "required": False, "schema": schema(f.name)})
    return params


def _content(output) -> dict:
    if output.full_name == "google.api.HttpBody":  # a file (an export), sent as it is
        return {
            "application/geo+json": {"schema": {"type": "object"}},
            "application/dicom": {"schema": {"type": "string", "format": "binary"}},
        }
    return {"application/json": {"schema": _ref(output)}}


def _one_of_parts(files) -> dict:
    """A bytes part excludes its oneof's other members from the JSON `request` part."""
    rules = [
        {
            "if": {"required": [f.json_name]},
            "then": {
                "properties": {
                    "request": {"not": {"anyOf": [{"required": [o.json_name]} for o in f.containing_oneof.fields]}}
                }
            },
        }
        for f in files
        if f.containing_oneof is not None
    ]
    return {"allOf": rules} if rules else {}


def document() -> dict:
    schemas: dict = {"Error": ERROR}
    paths: dict = {}
    for m in methods():
        _collect(m.input, schemas)
        if m.output.full_name != "google.api.HttpBody":
            _collect(m.output, schemas)
        op: dict = {
            "operationId": m.name,
            "summary": f"{SERVICE.full_name}.{m.name}",
            "tags": [SERVICE.name],
            "parameters": _parameters(m),
            "responses": {
                "200": {"description": "OK", "content": _content(m.output)},
                "default": {
                    "description": "error: the gRPC status as {code, message}",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                },
            },
        }
        if m.rule.body:
            rules = _RULES.get(m.input.full_name, ({}, {}))[1]
            required = "required" in rules or "anyOf" in rules
            content = {"application/json": {"schema": _ref(m.input)}}
            files = [f for f in m.input.fields if f.type == FD.TYPE_BYTES and not f.is_repeated]
            if files:
                content["multipart/form-data"] = {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "request": {**_ref(m.input), "description": f"JSON of {m.input.full_name}"},
                            **{f.json_name: {"type": "string", "format": "binary"} for f in files},
                        },
                        "additionalProperties": False,
                        **(
                            {"anyOf": [{"required": [p]} for p in ("request", *(f.json_name for f in files))]}
                            if required
                            else {}
                        ),
                        **_one_of_parts(files),
                    },
                    "encoding": {"request": {"contentType": "application/json"}},
                }
            op["requestBody"] = {"required": required, "content": content}
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
