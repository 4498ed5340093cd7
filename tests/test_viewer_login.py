"""The viewer's OIDC login (authorization code + PKCE, a public client) in Debian's Chromium
against a real IdP: npm's oidc-provider (OpenID Certified) run by Debian's node, with its own
login and consent pages (tests/cluster/idp/login.mjs). The gateway verifies the JWT access
token the page got (issuer, audience, signature from the IdP's JWKS), so the page shows the
caller and its tenant, and finds that tenant's slides only.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time

import httpx
import pytest

from smily import stack
from smily.index.faiss_index import IndexConfig, TileIndex
from smily.localstack import free_port

from .conftest import ROOT, base_settings
from .test_slide_search import A, fill
from .test_viewer_browser import browser, js, shot, wait  # noqa: F401 (fixture)

IDP = os.path.join(ROOT, "tests", "cluster", "idp")
CLIENT_ID = "smily-viewer"
ACCOUNTS = {"pat-a": {"tenant": A, "roles": ["smily.search"]}}


def start_idp(port: int, redirect_uri: str, log_path: str) -> subprocess.Popen:
    if not shutil.which("node"):
        pytest.fail("node is missing: apt-get install -y nodejs npm")
    if not os.path.isdir(os.path.join(IDP, "node_modules", "oidc-provider")):
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=IDP, check=True)
    env = dict(
        os.environ,
        ISSUER=f"http://127.0.0.1:{port}",
        PORT=str(port),
        AUDIENCE="smily",
        CLIENT_ID=CLIENT_ID,
        REDIRECT_URI=redirect_uri,
        ROLES_CLAIM="roles",
        TENANT_CLAIM="tenant",
        ACCOUNTS=json.dumps(ACCOUNTS),
    )
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(["node", os.path.join(IDP, "login.mjs")], env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{env['ISSUER']}/.well-known/openid-configuration", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            with open(log_path) as fh:
                pytest.fail(f"the login IdP did not start: {fh.read()[-2000:]}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def viewer(tmp_path_factory, slide_dir, model_repo):
    """The services (the index holding two tenants' slides), the gateway taking the IdP's tokens,
    the HTTP server naming the IdP to the page, and the IdP redirecting to it: (viewer URL, issuer)."""
    from smily.http.server import Running

    work = tmp_path_factory.mktemp("viewer-login")
    index = TileIndex(str(work), IndexConfig(snapshot_interval_s=0))
    fill(index)
    index.close()
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    s = base_settings(
        auth="oidc",
        oidc_issuer=issuer,
        oidc_audience="smily",
        oidc_tenant_claim="tenant",
        index_dir=str(work),
        slide_roots=(slide_dir,),
        model_repository=model_repo,
        viewer_oidc_issuer=issuer,
        viewer_oidc_client_id=CLIENT_ID,
        viewer_oidc_scope="openid profile smily",
    )
    running, s = stack.start(stack.ORDER, s)
    http = Running(s.replace(http_port=0, http_gateway_target=f"127.0.0.1:{s.gateway.gateway_port}"))
    idp = start_idp(port, http.url + "/", str(work / "idp.log"))
    yield http.url, issuer
    idp.terminate()
    idp.wait(10)
    http.stop()
    stack.stop(running, 0)


def claims(token: str) -> dict:
    body = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


def test_login_through_the_idp_then_find_slides_with_the_token(browser, viewer):  # noqa: F811 (fixture)
    from selenium.webdriver.common.by import By

    url, issuer = viewer
    assert httpx.get(url + "/v1/slides").status_code == 401  # the API takes no call without a token
    d = browser
    d.delete_all_cookies()
    d.get(url + "/")
    login = wait(d, lambda d: d.find_element(By.ID, "login").is_displayed() and d.find_element(By.ID, "login"))
    assert "Log in" in d.find_element(By.ID, "status").text
    login.click()

    # The IdP's own pages: sign in, then consent.
    wait(d, lambda d: d.current_url.startswith(issuer) and d.find_elements(By.NAME, "login"))
    d.find_element(By.NAME, "login").send_keys("pat-a")
    d.find_element(By.NAME, "password").send_keys("any")
    shot(d, "20-idp-login")
    d.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait(d, lambda d: d.current_url.startswith(issuer) and "consent" in d.page_source.lower())
    d.find_element(By.CSS_SELECTOR, "button[type=submit]").click()

    # Back in the viewer with the code exchanged (PKCE): the caller, its tenant and its slides.
    wait(d, lambda d: d.current_url.startswith(url) and js(d, "return !!(window.smily && window.smily.ready)"))
    assert "code=" not in d.current_url  # the code left the address bar
    assert d.find_element(By.ID, "caller").text == "Signed in as pat-a"
    assert d.find_element(By.ID, "tenant").text == f"Tenant: {A}"
    assert not d.find_element(By.ID, "login").is_displayed()
    token = js(d, "return window.smily.state.token")
    got = claims(token)
    assert got["iss"] == issuer and got["aud"] == "smily" and got["tenant"] == A and got["sub"] == "pat-a"
    # Tokens live in memory only, never in the browser's storage.
    stored = js(d, "return JSON.stringify(Object.assign({}, localStorage, sessionStorage))")
    assert token not in stored

    def listed(d):
        return js(d, "return [...document.querySelectorAll('#slide-list button')].map(b => b.dataset.slideId)")

    assert listed(d) == ["a-1", "a-2", "a-3", "a-4", "a-5"]  # site-a's, none of site-b's
    d.find_element(By.ID, "slide-find").send_keys("S24-01")
    wait(d, lambda d: listed(d) == ["a-1", "a-2"])  # b-1 matches too, but is site-b's
    shot(d, "21-logged-in-find")
