"""The gateway's one boundary interceptor: authenticate, authorise, audit.

Every RPC except health checks: the bearer token is verified, the caller's
roles are checked against the RPC, the caller is bound for the handler
(smily.common.caller.current()), and an audit record is written whatever
the outcome. A write is first recorded durably as attempted: if that record
cannot be written the call fails with FAILED_PRECONDITION and nothing
changes. Every call's outcome record follows, and a call whose record cannot
be written fails the same way (nothing is returned unrecorded).
"""

from __future__ import annotations

import datetime
import functools
import logging
import re
import sys
import uuid

import grpc

from smily.common import caller as callers
from smily.common import viewsession
from smily.common.config import Settings
from smily.common.errors import FailedPrecondition, ServiceError, status_of
from smily.common.server import Admission
from smily.common.tls import HEALTH_SERVICE

from . import audit, auth
from .sessions import ViewSessions

log = logging.getLogger("smily.guard")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_SESSION_READS = frozenset({"/smily.gateway.v1.GatewayService/ReadRegion", "/smily.gateway.v1.GatewayService/GetSlide"})


class Guard(grpc.ServerInterceptor):
    def __init__(self, settings: Settings):
        self._auth = auth.authenticator(settings.auth)
        self._audit = audit.AuditLog(settings.auth.audit_log)
        self._case_key = settings.gateway.case_key
        self._quota = Admission(sys.maxsize, settings.limits.max_rpcs_per_caller)
        # Issue 24: one tenant's load cannot take every slot from the others.
        self._tenant_quota = Admission(sys.maxsize, settings.limits.max_rpcs_per_tenant, who="tenant")
        self._sessions = ViewSessions(viewsession.key(settings), settings.auth.view_session_ttl_s, self._audit)

    def close(self) -> None:
        """Write the records of the view sessions still open (the server is stopping)."""
        self._sessions.close_all()

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
        record = functools.partial(self._record, method, metadata, context, request, request_id=request_id)
        self._sessions.sweep()
        who = callers.ANONYMOUS
        try:
            self._check_sink()
            who = self._auth.authenticate(metadata)
            auth.authorise(who, method)
            if audit.is_write(method):
                record(None, None, who, recorded, attempt=True)  # durably, before anything changes
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
            record(None, code, who, recorded)
            if code == grpc.StatusCode.INTERNAL and not isinstance(exc, (ServiceError, grpc.RpcError)):
                raise ServiceError(message) from exc  # logged once, by status_of, with the id the caller gets
            raise
        session = self._session_of(method, metadata, who, request)
        if session is None or not self._sessions.covered(session, who, request, metadata, context.peer()):
            record(response, grpc.StatusCode.OK, who, recorded)
        return response

    def _session_of(self, method, metadata, who, request) -> str | None:
        """The verified view session this read belongs to, if any (an unverifiable id is ignored)."""
        if method not in _SESSION_READS:
            return None
        session = next((v for k, v in metadata if k == viewsession.HEADER), "")
        slide_id = request.region.slide_id if hasattr(request, "region") else request.slide_id
        return session if self._sessions.verify(session, who, slide_id) else None

    def _check_sink(self) -> None:
        try:
            self._audit.check()
        except Exception as exc:
            log.error("audit log cannot be written; refusing calls", extra={"error": type(exc).__name__})
            raise FailedPrecondition("the audit trail cannot be written; the call was not served") from None

    def _record(self, method, metadata, context, request, response, code, who, recorded, *, request_id, attempt=False):
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
            attempt=attempt,
        )
        try:
            self._audit.write(event, durable=attempt)
        except Exception as exc:
            log.error("audit record not written; failing the call", extra={"error": type(exc).__name__})
            raise FailedPrecondition("the audit trail cannot be written; the call was not served") from None
