"""The cluster as the command line sees it: its HTTP API at one URL, with credentials from the
environment.

`RAYCACHE_URL` (default `http://127.0.0.1:8000`) is where the ingress listens; admin calls carry
`RAYCACHE_ADMIN_TOKEN`, client calls `RAYCACHE_API_KEY` (needed only where the cluster has API
keys configured). Every failure becomes a `CliError` whose message says what went wrong in one
line, and whose code says which kind of failure it was (see `errors.py`).
"""

from __future__ import annotations

import os
from typing import Any

import httpx

from serve_app.cli.errors import CliError, ExitCode

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "RAYCACHE_URL"
ADMIN_TOKEN_ENV = "RAYCACHE_ADMIN_TOKEN"
API_KEY_ENV = "RAYCACHE_API_KEY"


def admin_token() -> str:
    """The operator's admin token from the environment; a `CliError` when it is unset."""
    token = os.environ.get(ADMIN_TOKEN_ENV, "").strip()
    if not token:
        raise CliError(f"set {ADMIN_TOKEN_ENV} to the cluster's admin token", ExitCode.CREDENTIALS)
    return token


def api_key() -> str | None:
    """The client API key from the environment, if any."""
    return os.environ.get(API_KEY_ENV, "").strip() or None


def bearer(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


def describe_failure(response: httpx.Response) -> CliError:
    """The `CliError` for an error response: the server's own message, and the field it names."""
    message = response.reason_phrase or "error"
    try:
        error = response.json().get("error", {})
        message = error.get("message") or message
        if error.get("param"):
            message = f"{error['param']}: {message}"
    except (ValueError, AttributeError):
        pass
    status = response.status_code
    if status in (401, 403):
        code = ExitCode.CREDENTIALS
    elif status < 500:
        code = ExitCode.REFUSED
    else:
        code = ExitCode.SERVER_ERROR
    return CliError(f"{response.request.url.path}: {status} {message}", code)


def unreachable(url: str, exc: httpx.HTTPError) -> CliError:
    reason = "timed out" if isinstance(exc, httpx.TimeoutException) else "nothing answers"
    return CliError(f"cannot reach the cluster at {url} ({reason})", ExitCode.UNREACHABLE)


class Cluster:
    """Blocking calls to one cluster's HTTP API; each returns the decoded JSON document."""

    def __init__(self, url: str, timeout_s: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *_: object) -> None:
        self._http.close()

    def get(self, path: str) -> Any:
        return self._call("GET", path, None, bearer(api_key()))

    def post(self, path: str, body: dict[str, Any], admin: bool = False) -> Any:
        token = admin_token() if admin else api_key()
        return self._call("POST", path, body, bearer(token))

    def _call(
        self, method: str, path: str, body: dict[str, Any] | None, headers: dict[str, str]
    ) -> Any:
        try:
            response = self._http.request(method, path, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise unreachable(self.url, exc) from None
        if response.status_code >= 400:
            raise describe_failure(response)
        try:
            return response.json()
        except ValueError:
            raise CliError(
                f"{path}: the answer is not JSON; is {self.url} a raycache cluster?",
                ExitCode.SERVER_ERROR,
            ) from None
