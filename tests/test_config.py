"""Settings: grouped by concern, each field still set by SMILY_<FIELD> (or read from SMILY_<FIELD>_FILE); booleans parse strictly."""

from __future__ import annotations

import dataclasses

import pytest

from smily.common.config import FIELDS, FROM_FILE, GROUP_OF, ConfigError, Settings, file_variable, variable


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


# -- secrets as files (SMILY_<FIELD>_FILE, a mounted Secret) ----------------------


@pytest.mark.unit
def test_every_string_setting_reads_from_its_file(tmp_path):
    assert {"redis_password", "cache_key", "index_database_url", "redis_url", "oidc_issuer"} <= FROM_FILE
    env = {}
    for name in sorted(FROM_FILE):
        path = tmp_path / name
        path.write_text(f"value of {name}\n")
        env[file_variable(name)] = str(path)
    s = Settings.from_env(env)
    for name in FROM_FILE:
        assert getattr(getattr(s, GROUP_OF[name]), name) == f"value of {name}", name


@pytest.mark.unit
def test_only_the_trailing_newline_is_stripped(tmp_path):
    path = tmp_path / "password"
    path.write_bytes(b" pass word\twith spaces \r\n")
    assert (
        Settings.from_env({"SMILY_REDIS_PASSWORD_FILE": str(path)}).gateway.redis_password == " pass word\twith spaces "
    )


@pytest.mark.unit
def test_setting_both_the_value_and_its_file_is_an_error_naming_both(tmp_path):
    path = tmp_path / "key"
    path.write_text("from-file")
    with pytest.raises(ConfigError, match="SMILY_CACHE_KEY and SMILY_CACHE_KEY_FILE are both set"):
        Settings.from_env({"SMILY_CACHE_KEY": "from-env", "SMILY_CACHE_KEY_FILE": str(path)})


@pytest.mark.unit
@pytest.mark.parametrize("make", ["missing", "directory", "not-utf8"])
def test_an_unreadable_file_names_its_variable_never_its_content(tmp_path, make):
    path = tmp_path / "secret"
    if make == "directory":
        path.mkdir()
    elif make == "not-utf8":
        path.write_bytes(b"hunter2\xff\xfe")
    with pytest.raises(ConfigError, match="^SMILY_INDEX_DATABASE_URL_FILE=") as err:
        Settings.from_env({"SMILY_INDEX_DATABASE_URL_FILE": str(path)})
    assert "hunter2" not in str(err.value) and "xff" not in str(err.value)


@pytest.mark.unit
def test_settings_with_a_file_twin_or_holding_a_path_keep_their_meaning(tmp_path):
    # view_session_key_file is a setting of its own: its variable names the key's file (read by
    # smily.common.viewsession), so SMILY_VIEW_SESSION_KEY_FILE is not read here.
    assert "view_session_key" not in FROM_FILE and "tls_cert_file" not in FROM_FILE
    s = Settings.from_env({"SMILY_VIEW_SESSION_KEY_FILE": "/no/such/key", "SMILY_TLS_CERT_FILE": "/no/such/crt"})
    assert (s.auth.view_session_key_file, s.auth.view_session_key, s.tls.tls_cert_file) == (
        "/no/such/key",
        "",
        "/no/such/crt",
    )
    # Numbers, booleans and lists are never secrets: no _FILE form.
    assert not {"gateway_port", "plaintext", "slide_roots"} & FROM_FILE
    # No _FILE variable is also a setting's own variable.
    assert not {file_variable(n) for n in FROM_FILE} & {variable(n) for n in FIELDS}
