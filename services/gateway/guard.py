"""The gateway's one boundary interceptor: authenticate, authorise, audit.

Every RPC except health checks: the bearer token is verified, the caller's
roles are checked against the RPC, the caller is bound for the handler
(smily.common.caller.current()), and one audit record is written whatever
the outcome. If the audit sink cannot be written the call fails with
FAILED_PRECONDITION: checked before the handler runs (nothing happens
unrecorded) and again after (nothing is returned unrecorded).
"""

from __future__ import annotations

import datetime
import logging
import re
import sys
import threading
import uuid
from collections import OrderedDict

import grpc

from smily.common import caller as callers
from smily.common.config import Settings
from smily.common.errors import FailedPrecondition, ServiceError, status_of
from smily.common.server import Admission
from smily.common.tls import HEALTH_SERVICE

from . import audit, auth

log = logging.getLogger("smily.guard")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# A viewer reads a slide as many tiles (ReadRegion) under one view session
# (x-smily-view-session, set by the HTTP process): the slide's first successful
# read in a session is the audit record of the view, not each tile. Refusals
# are always recorded. Sessions remembered, at most:
VIEW_SESSIONS = 10_000
_READ_REGION = "/smily.gateway.v1.GatewayService/ReadRegion"


class Guard(grpc.ServerInterceptor):
    def __init__(self, settings: Settings):
        self._auth = auth.authenticator(settings.auth)
        self._audit = audit.AuditLog(settings.auth.audit_log)
        self._case_key = settings.gateway.case_key
        self._quota = Admission(sys.maxsize, settings.limits.max_rpcs_per_caller)
        # Issue 24: one tenant's load cannot take every slot from the others.
        self._tenant_quota = Admission(sys.maxsize, settings.limits.max_rpcs_per_tenant, who="tenant")
        self._viewed: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self._viewed_lock = threading.Lock()

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method.startswith(f"/{HEALTH_SERVICE}/"):
            return handler
        method, metadata = details.method, tuple(details.invocation_metadata or ())
        if handler.unary_unary:
            inner = handler.unary_unary

            def unary(request, context):
                return self._call(method, metadata, context, request, lambda: inner(request, context))

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
        # Streaming RPCs (only reflection, when on): admitted or refused and recorded once,
        # at the start; their messages are not inspected.
        for kind, make in (
            ("unary_stream", grpc.unary_stream_rpc_method_handler),
            ("stream_unary", grpc.stream_unary_rpc_method_handler),
            ("stream_stream", grpc.stream_stream_rpc_method_handler),
        ):
            inner = getattr(handler, kind)
            if inner is not None:

                def run(request, context, inner=inner):
                    try:
                        self._call(method, metadata, context, None, lambda: None)
                    except ServiceError as exc:
                        context.abort(exc.code, str(exc))
                    return inner(request, context)

                return make(run, handler.request_deserializer, handler.response_serializer)
        return handler

    def _call(self, method, metadata, context, request, serve):
        recorded = datetime.datetime.now(datetime.timezone.utc)
        request_id = (
            next((v for k, v in metadata if k == "x-request-id" and _REQUEST_ID.match(v)), None) or uuid.uuid4().hex
        )
        who = callers.ANONYMOUS
        try:
            self._check_sink()
            who = self._auth.authenticate(metadata)
            auth.authorise(who, method)
            token = callers.bind(who)
            try:
                # The per-caller quota counts verified identities, so it comes after authentication.
                key = self._quota.enter("gateway", context)
                try:
                    tenant = self._tenant_quota.enter("gateway", context, who.tenant)
                    try:
                        response = serve()
                    finally:
                        self._tenant_quota.leave(tenant)
                finally:
                    self._quota.leave(key)
            finally:
                callers.unbind(token)
        except Exception as exc:
            code, message = status_of(exc, context)
            self._record(method, metadata, context, request, None, code, who, request_id, recorded)
            if code == grpc.StatusCode.INTERNAL and not isinstance(exc, (ServiceError, grpc.RpcError)):
                raise ServiceError(message) from exc  # logged once, by status_of, with the id the caller gets
            raise
        if not self._viewed_before(method, metadata, who, request):
            self._record(method, metadata, context, request, response, grpc.StatusCode.OK, who, request_id, recorded)
        return response

    def _viewed_before(self, method, metadata, who, request) -> bool:
        """True for a tile of a slide this caller already viewed in this view session."""
        session = next((v for k, v in metadata if k == "x-smily-view-session"), "")
        if method != _READ_REGION or not session:
            return False
        key = (session[:128], who.subject, request.region.slide_id)
        with self._viewed_lock:
            if key in self._viewed:
                self._viewed.move_to_end(key)
                return True
            self._viewed[key] = None
            if len(self._viewed) > VIEW_SESSIONS:
                self._viewed.popitem(last=False)
        return False

    def _check_sink(self) -> None:
        try:
            self._audit.check()
        except Exception as exc:
            log.error("audit log cannot be written; refusing calls", extra={"error": type(exc).__name__})
            raise FailedPrecondition("the audit trail cannot be written; the call was not served") from None

    def _record(self, method, metadata, context, request, response, code, who, request_id, recorded) -> None:
        event = audit.event(
            request_id=request_id,
            method=method,
            code=code,
            subject=who.subject,
            issuer=who.issuer,
            tenant=who.tenant if who is not callers.ANONYMOUS else "",
            peer=context.peer(),
            forwarded=audit.forwarded_for(metadata),
            request=request,
            response=response,
            case_key=self._case_key,
            recorded=recorded,
        )
        try:
            self._audit.write(event)
        except Exception as exc:
            log.error("audit record not written; failing the call", extra={"error": type(exc).__name__})
            raise FailedPrecondition("the audit trail cannot be written; the call was not served") from None
