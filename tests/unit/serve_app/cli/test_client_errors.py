"""How the cluster's answers become the command's one-line failures and exit codes."""

from __future__ import annotations

import httpx
import pytest

from serve_app.cli.client import admin_token, describe_failure
from serve_app.cli.errors import ExitCode


def _response(status: int, body: object) -> httpx.Response:
    request = httpx.Request("POST", "http://cluster/v1/models/m/version")
    return httpx.Response(status, json=body, request=request)


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, ExitCode.REFUSED),
        (404, ExitCode.REFUSED),
        (409, ExitCode.REFUSED),
        (401, ExitCode.CREDENTIALS),
        (403, ExitCode.CREDENTIALS),
        (500, ExitCode.SERVER_ERROR),
        (503, ExitCode.SERVER_ERROR),
    ],
)
def test_an_error_answer_keeps_the_servers_message_and_field(status, code):
    error = describe_failure(
        _response(status, {"error": {"message": "must be a string", "param": "version"}})
    )
    assert error.code == code
    assert error.message == f"/v1/models/m/version: {status} version: must be a string"


def test_an_error_without_a_json_body_still_reads_as_one_line():
    request = httpx.Request("GET", "http://cluster/healthz")
    error = describe_failure(httpx.Response(502, text="<html>bad gateway</html>", request=request))
    assert error.code == ExitCode.SERVER_ERROR and "\n" not in error.message


def test_admin_commands_need_the_token_in_the_environment(monkeypatch):
    monkeypatch.delenv("RAYCACHE_ADMIN_TOKEN", raising=False)
    with pytest.raises(Exception, match="RAYCACHE_ADMIN_TOKEN") as caught:
        admin_token()
    assert caught.value.code == ExitCode.CREDENTIALS
    monkeypatch.setenv("RAYCACHE_ADMIN_TOKEN", "  secret ")
    assert admin_token() == "secret"
