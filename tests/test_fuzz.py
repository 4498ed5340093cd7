"""Property test: every public request message, its fields fuzzed (sizes,
NaN/inf, negative and huge numbers, odd strings, hostile images), gets a clean
status from the documented set from the real gateway, which keeps serving.

The strategies are built from the messages' descriptors, so a field added to
gateway.proto is fuzzed without touching this file. Run with -s to see how
many cases ran.
"""

from __future__ import annotations

import io

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from smily import stack as local_stack
from smily.client import Client
from smily.common.server import MAX_MESSAGE_BYTES
from smily.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from .conftest import CMU, base_settings
from .helpers.procstack import SERVING, health
from .helpers.wait import wait_done

C = grpc.StatusCode
# The documented statuses for a healthy stack. INTERNAL and UNKNOWN are bugs.
CLEAN = {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION, C.RESOURCE_EXHAUSTED}
EXAMPLES_PER_METHOD = 30
RAN: dict[str, int] = {}
METHODS = list(gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].methods_by_name)


def _png(size, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


SMALL_PNG = _png((32, 32))
BOMB_PNG = _png((11000, 11000), "1")
ODD_TEXT = st.sampled_from(
    [
        "",
        " ",
        "\0",
        "a\0b",
        "\u202e",
        "\u200b",
        "../../etc/passwd",
        "/etc/passwd",
        "a/b",
        "%2e%2e/x",
        "x" * 5000,
        "cmu",
        CMU,
        "efficientnet-lite0/1",
        "é" * 200,
        "\n",
        "\\",
    ]
)
ODD_BYTES = st.sampled_from(
    [b"", SMALL_PNG, BOMB_PNG, SMALL_PNG[:40], b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"\0" * 1000]
)
_INT_EDGES = {F.TYPE_INT32: 2**31 - 1, F.TYPE_INT64: 2**63 - 1, F.TYPE_SINT32: 2**31 - 1, F.TYPE_SINT64: 2**63 - 1}
_UINT_EDGES = {F.TYPE_UINT32: 2**32 - 1, F.TYPE_UINT64: 2**64 - 1}


def _scalar(field) -> st.SearchStrategy:
    t = field.type
    if t == F.TYPE_STRING:
        return ODD_TEXT | st.text(max_size=40)
    if t == F.TYPE_BYTES:
        return ODD_BYTES | st.binary(max_size=100)
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return st.floats(width=64 if t == F.TYPE_DOUBLE else 32) | st.sampled_from(
            [0.0, -0.0, -1.0, 1e-300 if t == F.TYPE_DOUBLE else 1e-30, 50.0, 1e30, float("nan"), float("inf")]
        )
    if t == F.TYPE_ENUM:
        return st.integers(-3, 10)
    if t in _INT_EDGES:
        top = _INT_EDGES[t]
        return st.sampled_from([0, -1, 1, 3, 1000, top, -top - 1]) | st.integers(-top - 1, top)
    if t in _UINT_EDGES:
        return st.integers(0, _UINT_EDGES[t])
    raise NotImplementedError(field.full_name)


def message(descriptor, depth: int = 0) -> st.SearchStrategy:
    """A strategy of kwargs-built messages for any descriptor (recursion capped)."""
    cls = _class(descriptor)
    fields = {}
    for f in descriptor.fields:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            k, v = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            small = st.dictionaries(_scalar(k), _scalar(v), max_size=3)
            many = st.integers(30, 1100).map(lambda n: {f"k{i}": "v" for i in range(n)})
            fields[f.name] = small | many
            continue
        if f.message_type is not None:
            if depth >= 2:
                continue
            elem = st.deferred(lambda d=f.message_type: message(d, depth + 1))
        else:
            elem = _scalar(f)
        if f.is_repeated:
            fields[f.name] = st.lists(elem, max_size=3) | st.lists(elem, min_size=33, max_size=40)
        else:
            fields[f.name] = elem
    return st.fixed_dictionaries({}, optional=fields).map(lambda kw: _build(cls, kw))


def _class(descriptor):
    return getattr(gateway_pb2, descriptor.name)


def _build(cls, kwargs: dict):
    msg = cls()
    for name, value in kwargs.items():
        field = cls.DESCRIPTOR.fields_by_name[name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            getattr(msg, name).update(value)
        elif field.is_repeated:
            getattr(msg, name).extend(value)
        elif field.message_type is not None:
            getattr(msg, name).CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg


@pytest.fixture(scope="module")
def gateway(slide_dir, model_repo, redis_url, tmp_path_factory):
    """Its own stack and index: fuzzed ingests and deletes must not touch other tests' slides."""
    running, s = local_stack.start(
        local_stack.ORDER,
        base_settings(
            slide_roots=(slide_dir,),
            model_repository=model_repo,
            redis_url=redis_url,
            tiler_readers=1,
            index_dir=str(tmp_path_factory.mktemp("fuzz-index")),
        ),
    )
    target = f"127.0.0.1:{s.gateway.gateway_port}"
    ch = grpc.insecure_channel(
        target,
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    stub = gateway_pb2_grpc.GatewayServiceStub(ch)
    client = Client(target, timeout=60)
    op = wait_done(client, client.ingest(CMU, "cmu"))
    client.close()
    assert op.state == gateway_pb2.OPERATION_STATE_SUCCEEDED, op.error_message
    yield stub, target
    ch.close()
    local_stack.stop(running, 0)
    print(f"\nHypothesis cases run against the gateway: {sum(RAN.values())} ({RAN})")


@pytest.mark.parametrize("method", METHODS)
def test_every_request_gets_a_clean_status_and_the_gateway_keeps_serving(gateway, method):
    stub, target = gateway
    desc = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].methods_by_name[method]

    @settings(
        max_examples=EXAMPLES_PER_METHOD,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(message(desc.input_type))
    def check(request):
        RAN[method] = RAN.get(method, 0) + 1
        try:
            getattr(stub, method)(request, timeout=60)
            code, details = C.OK, ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
        assert code in CLEAN, (method, code, details, request)

    check()
    assert health(target) == SERVING
    stub.ListSlides(gateway_pb2.ListSlidesRequest(), timeout=10)
