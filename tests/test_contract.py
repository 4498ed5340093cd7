"""Each RPC's facts live in its proto (smily.options.v1, idempotency_level,
google.api.http): every RPC declares them, and the servers' tables are
exactly what the protos say."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool

from smily.common import rpcmeta
from smily.common.caller import Caller
from smily.common.errors import NotFound, PermissionDenied, status_of
from smily.gateway import auth

M = descriptor_pb2.MethodOptions
DCM_TYPES = {"110100", "110103", "110107", "110112"}


def _gateway_methods():
    return list(rpcmeta.GATEWAY.methods)


def test_the_protos_declare_every_option():
    assert rpcmeta.problems() == []


@pytest.mark.parametrize("method", _gateway_methods(), ids=lambda m: m.name)
def test_every_gateway_rpc_has_a_role_an_audit_type_and_a_route(method):
    path = f"/{rpcmeta.GATEWAY.full_name}/{method.name}"
    assert rpcmeta.ROLES[path] and rpcmeta.ROLES[path] <= {auth.SEARCH, auth.INGEST, auth.ADMIN, auth.OPERATOR}
    # The operator's RPCs cross tenants: no tenant's role may call them too (issue 24).
    assert auth.OPERATOR not in rpcmeta.ROLES[path] or rpcmeta.ROLES[path] == {auth.OPERATOR}
    (system, code, display), action = rpcmeta.EVENTS[method.name]
    assert system == rpcmeta.DCM and code in DCM_TYPES and display and action in "CRUDE"
    rule = rpcmeta.RULES[method.name]
    assert rule.verb in ("GET", "POST", "DELETE") and rule.path.startswith("/v1/")
    assert set(rpcmeta.path_fields(rule)) <= {f.name for f in method.input_type.fields}


def test_the_operator_may_call_two_rpcs_and_a_tenants_admin_neither():
    ops = {p.rsplit("/", 1)[1] for p, roles in rpcmeta.ROLES.items() if auth.OPERATOR in roles}
    assert ops == {"ListTenants", "MoveSlide"}


@pytest.mark.parametrize("service", rpcmeta.SERVICES, ids=lambda s: s.name)
def test_every_rpc_states_its_idempotency_level(service):
    for m in service.methods:
        assert m.GetOptions().HasField("idempotency_level"), m.full_name
        retried = m.name in rpcmeta.IDEMPOTENT[service.full_name]
        assert retried == (m.GetOptions().idempotency_level in (M.IDEMPOTENT, M.NO_SIDE_EFFECTS)), m.full_name


def test_writes_are_never_retried():
    assert "DeleteSlide" not in rpcmeta.IDEMPOTENT["smily.index.v1.IndexService"]
    assert "DeleteConcept" not in rpcmeta.IDEMPOTENT["smily.index.v1.IndexService"]
    for write in ("IngestSlide", "IngestCase", "CreateConcept", "DeleteConcept", "DeleteSlide"):
        assert write not in rpcmeta.IDEMPOTENT["smily.gateway.v1.GatewayService"]


def test_audit_types_of_case_ingest_and_viewer_reads():
    assert rpcmeta.EVENTS["IngestCase"] == ((rpcmeta.DCM, "110107", "Import"), "C")
    assert rpcmeta.EVENTS["GetSlide"][0][1] == "110103"
    assert rpcmeta.EVENTS["GetIndexInfo"][0][1] == "110112"


def test_an_ingest_only_caller_may_follow_an_operation_but_not_search():
    ingest = Caller("lis", roles=frozenset({auth.INGEST}))
    auth.authorise(ingest, "/smily.gateway.v1.GatewayService/GetOperation")
    auth.authorise(ingest, "/smily.gateway.v1.GatewayService/CancelOperation")
    with pytest.raises(PermissionDenied, match="smily.search"):
        auth.authorise(ingest, "/smily.gateway.v1.GatewayService/Search")
    with pytest.raises(PermissionDenied, match="smily.admin"):
        auth.authorise(ingest, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")


def test_caller_input_errors_come_from_the_protos():
    expected = {
        "tiler": {"GetSlideInfo", "ReadRegion", "ListCaseSeries"},
        "index": {"ListSlides", "PutConcept", "GetConcept", "DeleteConcept"},
        "embedder": {"Embed"},
    }
    assert expected == rpcmeta.CALLER_INPUT


def test_an_rpc_without_its_options_is_named():
    """What `make check` and every server's start-up refuse: an RPC added without its options."""
    pool = descriptor_pool.DescriptorPool()
    proto = descriptor_pb2.FileDescriptorProto(name="bare.proto", package="bare.v1", syntax="proto3")
    proto.message_type.add(name="Empty")
    proto.service.add(name="BareService").method.add(
        name="Forgot", input_type=".bare.v1.Empty", output_type=".bare.v1.Empty"
    )
    service = pool.Add(proto).services_by_name["BareService"]
    found = rpcmeta.problems(public=(service,), internal=())
    assert found == [
        "bare.v1.BareService/Forgot: no idempotency_level (IDEMPOTENCY_UNKNOWN if it must not be retried)",
        "bare.v1.BareService/Forgot: no (smily.options.v1.role)",
        "bare.v1.BareService/Forgot: no (smily.options.v1.audit_event) with a type and an action",
        'bare.v1.BareService/Forgot: no (google.api.http) route with body "*" or none',
    ]
    assert rpcmeta.problems(public=(), internal=(service,)) == [found[0]]


def test_one_status_for_every_exception(caplog):
    """errors.status_of: what the server interceptor, the audit guard and a failed ingest each report."""

    class Failed(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return "the index is unavailable; retry later"

    assert status_of(NotFound("no such slide")) == (grpc.StatusCode.NOT_FOUND, "no such slide")
    assert status_of(Failed()) == (grpc.StatusCode.UNAVAILABLE, "the index is unavailable; retry later")
    with caplog.at_level("ERROR", logger="smily.errors"):
        code, message = status_of(KeyError("/slides/patient-name.svs"))
    assert code == grpc.StatusCode.INTERNAL and message.startswith("internal error (error id ")
    assert "patient-name" not in message  # the traceback goes to the log only, under the same id
    error_id = message.removesuffix(")").rsplit(" ", 1)[-1]
    assert [r.error_id for r in caplog.records] == [error_id]
