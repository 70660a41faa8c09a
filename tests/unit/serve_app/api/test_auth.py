"""Tenants from credentials and the admin token: `serve_app.api.auth`."""

from __future__ import annotations

import hashlib

import pytest

from serve_app.api.auth import DEFAULT_TENANT, check_admin_token, load_tenant_auth
from serve_app.config import AuthSettings, ConfigError
from serve_app.errors import Forbidden, InvalidRequest, Unauthorized

ALICE_KEY = "alice-key-0123456789"
BOB_KEY = "bob-key-0123456789ab"


def keys_file(tmp_path, text):
    path = tmp_path / "keys.txt"
    path.write_text(text)
    return AuthSettings(api_keys_file=str(path))


def test_api_keys_map_to_their_tenants_from_a_file_and_the_environment(tmp_path):
    bob_digest = hashlib.sha256(BOB_KEY.encode()).hexdigest()
    settings = keys_file(tmp_path, f"# comment\nalice:{ALICE_KEY}\n\nbob:sha256:{bob_digest}\n")
    auth = load_tenant_auth(settings, {"RAYCACHE_API_KEYS": "carol:carol-key-0123456789"})
    assert auth.mode == "api_keys"
    assert auth.tenant_of(f"Bearer {ALICE_KEY}") == "alice"
    assert auth.tenant_of(f"bearer {BOB_KEY}") == "bob"
    assert auth.tenant_of("Bearer carol-key-0123456789") == "carol"


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer wrong-key-0123456789",
        f"Basic {ALICE_KEY}",
        ALICE_KEY,
        "Bearer ключ-ключ-ключ-ключ",
        "Bearer \udcff\udcfe",
    ],
)
def test_a_request_without_a_valid_key_is_unauthorized(tmp_path, header):
    auth = load_tenant_auth(keys_file(tmp_path, f"alice:{ALICE_KEY}\n"), {})
    with pytest.raises(Unauthorized) as raised:
        auth.tenant_of(header)
    assert raised.value.http_status == 401
    assert raised.value.param == "authorization"


def test_a_claimed_tenant_counts_only_behind_a_trusted_gateway(tmp_path):
    untrusted = load_tenant_auth(keys_file(tmp_path, f"alice:{ALICE_KEY}\n"), {})
    assert untrusted.tenant_of(f"Bearer {ALICE_KEY}", claimed="bob") == "alice"
    with pytest.raises(Unauthorized):
        untrusted.tenant_of(None, claimed="alice")
    trusted = load_tenant_auth(AuthSettings(trust_tenant_header=True), {})
    assert trusted.mode == "trusted_header"
    assert trusted.tenant_of(None, claimed="bob") == "bob"
    assert trusted.tenant_of(None) == DEFAULT_TENANT
    for claimed in ("no such/tenant", "bob\n"):
        with pytest.raises(InvalidRequest):
            trusted.tenant_of(None, claimed=claimed)


def test_without_keys_the_cluster_is_single_tenant():
    auth = load_tenant_auth(AuthSettings(), {})
    assert auth.mode == "single_tenant"
    assert auth.tenant_of(None, claimed="bob") == DEFAULT_TENANT
    assert auth.tenant_of("Bearer anything") == DEFAULT_TENANT


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("alice\n", "line 1"),
        ("alice:short\n", "16 characters"),
        ("bad tenant:long-enough-key-123\n", "tenant"),
        ("alice:sha256:xyz\n", "64 hex"),
        (f"alice:{ALICE_KEY}\nbob:{ALICE_KEY}\n", "another tenant"),
        # No client could send it: headers travel as ASCII and are read as Latin-1.
        ("alice:cl\u00e9-0123456789abcdef\n", "printable ASCII"),
        ("alice:two words 0123456789abcdef\n", "printable ASCII"),
        ("alice\n:long-enough-key-123\n", "line 1"),
    ],
)
def test_a_bad_key_file_fails_at_start_up_without_quoting_keys(tmp_path, text, problem):
    with pytest.raises(ConfigError, match=problem) as raised:
        load_tenant_auth(keys_file(tmp_path, text), {})
    assert ALICE_KEY not in str(raised.value)


def test_a_missing_key_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="api_keys_file"):
        load_tenant_auth(AuthSettings(api_keys_file=str(tmp_path / "none")), {})


def test_admin_routes_are_closed_without_a_token_and_refuse_a_wrong_one():
    with pytest.raises(Forbidden) as closed:
        check_admin_token("Bearer anything", None)
    assert closed.value.http_status == 403
    assert "RAYCACHE_ADMIN_TOKEN" in closed.value.message
    check_admin_token("Bearer s3cret-token", "s3cret-token")
    for header in (
        None,
        "",
        "Bearer wrong",
        "Basic s3cret-token",
        "s3cret-token",
        "Bearer ü\udcff",
    ):
        with pytest.raises(Unauthorized) as raised:
            check_admin_token(header, "s3cret-token")
        assert raised.value.http_status == 401
