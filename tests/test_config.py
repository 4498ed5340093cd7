"""Settings: grouped by concern, each field still set by SMILY_<FIELD>; booleans parse strictly."""

from __future__ import annotations

import dataclasses

import pytest

from smily.common.config import FIELDS, GROUP_OF, Settings, variable


def test_variables_set_fields_across_groups():
    s = Settings.from_env(
        {
            "SMILY_BIND_HOST": "0.0.0.0",
            "SMILY_MAX_TILES_PER_SLIDE": "7",
            "SMILY_TLS_BACKEND_CLIENTS": "a,b",
            "SMILY_OIDC_ROLES_CLAIM": "realm_access.roles",
            "SMILY_SLIDE_ROOTS": "/a:/b",
            "SMILY_MAX_QUEUE_DELAY_MS": "0.5",
            "SMILY_INDEX_TARGETS": "dns:///i-0:50053,dns:///i-1:50053",
            "SMILY_TILE_MPPS": "0.5,1",
            "SMILY_HTTP_PORT": "9",
        }
    )
    assert s.server.bind_host == "0.0.0.0"
    assert s.limits.max_tiles_per_slide == 7
    assert s.tls.tls_backend_clients == ("a", "b")
    assert s.auth.oidc_roles_claim == "realm_access.roles"
    assert s.tiler.slide_roots == ("/a", "/b")
    assert s.embedder.max_queue_delay_ms == 0.5
    assert s.index.index_targets == ("dns:///i-0:50053", "dns:///i-1:50053")
    assert s.gateway.tile_mpps == (0.5, 1.0)
    assert s.http.http_port == 9 == s.port_of("http")
    # What was not set keeps its default.
    assert s.gateway == dataclasses.replace(Settings().gateway, tile_mpps=(0.5, 1.0))


def test_every_field_has_one_group_and_its_own_variable():
    groups = {g.name: g.default for g in dataclasses.fields(Settings)}
    for name, group in GROUP_OF.items():
        assert name in {f.name for f in dataclasses.fields(groups[group])}
    assert len({variable(n) for n in FIELDS}) == len(FIELDS) == sum(len(dataclasses.fields(g)) for g in groups.values())


@pytest.mark.parametrize(
    "raw, value",
    [("1", True), ("true", True), ("TRUE", True), (" yes ", True), ("on", True), ("0", False), ("false", False)]
    + [("no", False), ("off", False), ("", False)],
)
def test_booleans_accept_the_usual_spellings(raw, value):
    assert Settings.from_env({"SMILY_PLAINTEXT": raw}).tls.plaintext is value


@pytest.mark.parametrize("variable_name", ["SMILY_PLAINTEXT", "SMILY_REFLECTION", "SMILY_GPU_FP16"])
@pytest.mark.parametrize("raw", ["ture", "yes please", "2", "enabled"])
def test_a_mistyped_boolean_is_an_error_naming_its_variable(variable_name, raw):
    with pytest.raises(ValueError, match=f"^{variable_name}="):
        Settings.from_env({variable_name: raw})


def test_replace_routes_field_names_to_their_groups():
    s = Settings().replace(gateway_port=0, tls_cert_file="c", auth="none")
    assert (s.gateway.gateway_port, s.tls.tls_cert_file, s.auth.auth) == (0, "c", "none")
    assert s.index == Settings().index
    assert Settings.from_env({}, redis_url="redis://r").gateway.redis_url == "redis://r"
    with pytest.raises(TypeError, match="not a setting: gateway_prot"):
        Settings().replace(gateway_prot=0)
