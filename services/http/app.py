"""The HTTP process: the JSON API under /v1, IIIF under /iiif/3, the viewer at /."""

from __future__ import annotations

import base64
import hashlib
from urllib.parse import urlsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from smily.common.config import Settings

from . import api, iiif, openapi, static
from .rpc import SERVICE, Gateway, methods, resolve

_HTTP_CODES = {
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class BodyLimit:
    """Refuses request bodies over max_bytes, declared or streamed (413)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max):
            return await self._refuse(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.max:
                raise HTTPException(413)
            return msg

        await self.app(scope, limited, send)

    async def _refuse(self, scope, receive, send):
        await api.error(grpc.StatusCode.RESOURCE_EXHAUSTED, f"request bodies are limited to {self.max} bytes", 413)(
            scope, receive, send
        )


# OpenSeadragon injects this one <style> element (a focus outline for touch screens);
# the CSP allows it by hash rather than allowing inline styles.
_OSD_STYLE = "@media (hover: none) {    .openseadragon-canvas:focus {        outline: none !important;    }}"
_OSD_STYLE_HASH = base64.b64encode(hashlib.sha256(_OSD_STYLE.encode()).digest()).decode()


class SecurityHeaders:
    """Headers on every response: a CSP allowing only our own scripts and styles (the page has no
    inline script or style), the API and the login's issuer to be fetched, and no framing."""

    def __init__(self, app, issuer: str):
        self.app = app
        origin = ""
        if issuer:
            u = urlsplit(issuer)
            origin = f" {u.scheme}://{u.netloc}"
        csp = (
            "default-src 'none'; script-src 'self'; "
            f"style-src 'self' 'sha256-{_OSD_STYLE_HASH}'; img-src 'self' blob: data:; "
            f"connect-src 'self'{origin}; form-action 'self'{origin}; frame-ancestors 'none'; base-uri 'none'"
        )
        self.headers = [
            (b"content-security-policy", csp.encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
            (b"x-frame-options", b"DENY"),
        ]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), *self.headers])
            await send(message)

        await self.app(scope, receive, with_headers)


def _http_error(request: Request, exc: Exception):
    assert isinstance(exc, HTTPException)  # registered for HTTPException only
    code = _HTTP_CODES.get(exc.status_code, grpc.StatusCode.INVALID_ARGUMENT)
    message = "request body too large" if exc.status_code == 413 else (exc.detail or code.name)
    response = api.error(code, message, exc.status_code)
    response.headers.update(exc.headers or {})  # a 405's Allow (RFC 9110 15.5.6)
    return response


def _api_routes(gateway: Gateway) -> list[Route]:
    """One route per path, answering each of its methods, so a 405 names them all in Allow."""
    by_path: dict[str, dict] = {}
    for m in methods():
        by_path.setdefault(m.rule.path, {})[m.rule.verb] = api.handler(m, gateway)

    def route(path: str, handlers: dict) -> Route:
        async def endpoint(request: Request):
            return await handlers["GET" if request.method == "HEAD" else request.method](request)

        return Route(path, endpoint, methods=list(handlers))

    # A custom method (`/v1/operations/{id}:cancel`) before its resource's path, which would match it too.
    paths = sorted(by_path, key=lambda path: ":" not in path.rsplit("/", 1)[-1])
    return [route(path, by_path[path]) for path in paths]


def build(settings: Settings, chan: grpc.Channel):
    """The ASGI app, calling the gateway over `chan`."""
    gateway = Gateway(chan, settings.http.http_timeout_s)
    tiles = iiif.IIIF(gateway, settings)
    spec = openapi.document()

    async def livez(request):
        return PlainTextResponse("ok")

    async def readyz(request):
        # Ready when the gateway says it serves: this process is nothing without it.
        try:
            health = health_pb2_grpc.HealthStub(chan)  # on the current channel (it follows a renewal)
            resp = await resolve(
                health.Check.future(health_pb2.HealthCheckRequest(service=SERVICE.full_name), timeout=2)
            )
        except grpc.RpcError as exc:
            return api.error(grpc.StatusCode.UNAVAILABLE, f"gateway: {exc.code().name}")
        if resp.status != health_pb2.HealthCheckResponse.SERVING:
            return api.error(grpc.StatusCode.UNAVAILABLE, "gateway is not serving")
        return PlainTextResponse("ok")

    async def openapi_json(request):
        return JSONResponse(spec)

    async def viewer_config(request):
        return JSONResponse(static.viewer_config(settings))

    async def index(request):
        return FileResponse(static.INDEX, headers={"Cache-Control": "no-cache"})

    routes: list[BaseRoute] = [
        *_api_routes(gateway),
        Route("/livez", livez),
        Route("/readyz", readyz),
        Route("/openapi.json", openapi_json),
        Route("/viewer/config.json", viewer_config),
        Route("/iiif/3/{slide_id}/info.json", tiles.info),
        Route("/iiif/3/{slide_id}/{region}/{size}/{rotation}/{quality}.{format}", tiles.image),
        Route("/", index),
        Mount("/static", StaticFiles(directory=static.STATIC)),
        *static.vendor_mounts(),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
    # Whose X-Forwarded-For is believed (api.client_address).
    app.state.trusted_proxies = api.trusted_networks(settings.http.http_trusted_proxies)
    return SecurityHeaders(BodyLimit(app, settings.http.http_max_body_bytes), settings.http.viewer_oidc_issuer)
