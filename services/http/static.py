"""Where the viewer's files are: our page under static/, the browser libraries
as npm installed them under vendor/node_modules (`make` runs `npm ci`; they are
served from there, nothing is copied and nothing comes from a CDN)."""

from __future__ import annotations

import os

from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from smily.common.config import Settings

HERE = os.path.dirname(os.path.abspath(__file__))
STATIC = os.path.join(HERE, "static")
INDEX = os.path.join(STATIC, "index.html")
NODE_MODULES = os.path.join(HERE, "vendor", "node_modules")
# URL prefix -> the built files of one npm package (only those are served).
VENDOR = {
    "/vendor/openseadragon": "openseadragon/build/openseadragon",
    "/vendor/oidc-client-ts": "oidc-client-ts/dist/browser",
}


def vendor_mounts() -> list[Mount]:
    mounts = []
    for prefix, rel in VENDOR.items():
        path = os.path.join(NODE_MODULES, rel)
        if not os.path.isdir(path):
            raise RuntimeError(f"{path} is missing: run `make web` (npm ci in services/http/vendor)")
        mounts.append(Mount(prefix, StaticFiles(directory=path)))
    return mounts


def viewer_config(settings: Settings) -> dict:
    """What the page needs to log in; no issuer means the API takes no tokens."""
    if not settings.http.viewer_oidc_issuer:
        return {"oidc": None}
    return {
        "oidc": {
            "authority": settings.http.viewer_oidc_issuer,
            "client_id": settings.http.viewer_oidc_client_id,
            "scope": settings.http.viewer_oidc_scope,
        }
    }
