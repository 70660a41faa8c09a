"""Who is asking: API keys map to tenants on the server; the admin token opens admin routes.

A tenant is never what a client says it is. `Authorization: Bearer <key>` (what OpenAI clients
send as `api_key`) is looked up among the configured keys (`auth.api_keys_file`,
`RAYCACHE_API_KEYS`); keys are held as SHA-256 digests, so a key file may store digests only.
With keys configured, a request without a valid key is `Unauthorized`. With none, the cluster is
single-tenant: every request is `default`. A tenant header counts only when the operator
declared the gateway in front trusted (`auth.trust_tenant_header`).

Metrics name a tenant only where the configuration bounds the names (`TenantAuth.tenant_label`):
the tenants of the API keys, or `default` without keys. Any other tenant, and every tenant
when a trusted gateway names them (its clients choose the names), is labelled `other`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Final, Literal

from cluster.secret import is_placeholder
from serve_app.config import (
    ADMIN_TOKEN_ENV,
    API_KEYS_ENV,
    BEARER_TOKEN_CHARS,
    AuthSettings,
    ConfigError,
)
from serve_app.errors import Forbidden, InvalidRequest, Unauthorized

DEFAULT_TENANT: Final = "default"
OTHER_TENANTS: Final = "other"
"""The `tenant` label of every tenant the configuration does not name (see the module
docstring)."""
TENANT_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,127}")
_DIGEST_PREFIX: Final = "sha256:"
_HEX_DIGEST: Final = re.compile(r"[0-9a-f]{64}")
AuthMode = Literal["api_keys", "single_tenant", "trusted_header"]


def bearer_token(authorization: str | None) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header, as bytes; None without one.

    Bytes, so that a header of any characters compares in constant time instead of raising.
    """
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip().encode("utf-8", "surrogateescape")


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


@dataclass(frozen=True)
class TenantAuth:
    """Maps a request's credentials to its tenant; see the module docstring."""

    keys: Mapping[bytes, str]
    """SHA-256 digest of an API key -> its tenant."""
    trust_tenant_header: bool = False

    @property
    def mode(self) -> AuthMode:
        """How tenants are decided, as `/healthz` reports it."""
        if self.trust_tenant_header:
            return "trusted_header"
        return "api_keys" if self.keys else "single_tenant"

    @cached_property
    def tenants(self) -> frozenset[str]:
        """The tenants the configuration names: those of the API keys, or `default` without
        keys."""
        return frozenset(self.keys.values()) if self.keys else frozenset({DEFAULT_TENANT})

    def tenant_label(self, tenant: str) -> str:
        """What stands for `tenant` in metric labels: itself when the configuration names it,
        otherwise `OTHER_TENANTS`, and always that in `trusted_header` mode, so a label is
        never a name a client chose."""
        if self.trust_tenant_header or tenant not in self.tenants:
            return OTHER_TENANTS
        return tenant

    def tenant_of(self, authorization: str | None, claimed: str | None = None) -> str:
        """The tenant of a request with these headers; raises `Unauthorized` (no valid key
        where keys are configured) or `InvalidRequest` (a trusted header that is no tenant)."""
        if self.trust_tenant_header and claimed:
            if not TENANT_PATTERN.fullmatch(claimed):
                raise InvalidRequest("is not a tenant name", param="tenant")
            return claimed
        if not self.keys:
            return DEFAULT_TENANT
        token = bearer_token(authorization)
        tenant = self.keys.get(_digest(token)) if token is not None else None
        if tenant is None:
            raise Unauthorized("a valid API key is required", param="authorization")
        return tenant


def load_tenant_auth(
    settings: AuthSettings, environ: Mapping[str, str] | None = None
) -> TenantAuth:
    """The keys of `settings.api_keys_file` and of `RAYCACHE_API_KEYS`; raises `ConfigError`
    naming the bad entry (never quoting a key)."""
    environ = os.environ if environ is None else environ
    keys: dict[bytes, str] = {}
    if settings.api_keys_file is not None:
        path = Path(settings.api_keys_file)
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"auth.api_keys_file: cannot read {path}: {exc.strerror}") from None
        for number, line in enumerate(lines, start=1):
            line = line.strip()
            if line and not line.startswith("#"):
                _add_key(keys, line, f"auth.api_keys_file line {number}")
    for number, entry in enumerate(environ.get(API_KEYS_ENV, "").split(","), start=1):
        if entry.strip():
            _add_key(keys, entry.strip(), f"{API_KEYS_ENV} entry {number}")
    return TenantAuth(keys=keys, trust_tenant_header=settings.trust_tenant_header)


def _add_key(keys: dict[bytes, str], entry: str, where: str) -> None:
    tenant, sep, key = entry.partition(":")
    if not sep or not TENANT_PATTERN.fullmatch(tenant):
        raise ConfigError(f"{where}: expected `tenant:key` with a tenant name of [A-Za-z0-9._-]")
    if key.startswith(_DIGEST_PREFIX):
        hex_digest = key[len(_DIGEST_PREFIX) :].lower()
        if not _HEX_DIGEST.fullmatch(hex_digest):
            raise ConfigError(f"{where}: a stored key is `sha256:` and 64 hex digits")
        digest = bytes.fromhex(hex_digest)
    elif len(key) < 16 or is_placeholder(key):
        raise ConfigError(f"{where}: an API key needs at least 16 characters, not a placeholder")
    elif not BEARER_TOKEN_CHARS.fullmatch(key):
        raise ConfigError(f"{where}: an API key must be printable ASCII without spaces")
    else:
        digest = _digest(key.encode())
    if keys.get(digest, tenant) != tenant:
        raise ConfigError(f"{where}: this key already belongs to another tenant")
    keys[digest] = tenant


def check_admin_token(authorization: str | None, token: str | None) -> None:
    """Pass only `Authorization: Bearer <token>`. Without a configured token admin routes are
    closed (`Forbidden`); a missing or wrong one is `Unauthorized`."""
    if token is None:
        raise Forbidden(
            f"admin routes are closed until an admin token is configured: start the cluster "
            f"with {ADMIN_TOKEN_ENV}=<token> (or set args.admin_token)",
            param="authorization",
        )
    given = bearer_token(authorization)
    if given is None or not hmac.compare_digest(given, token.encode()):
        raise Unauthorized("a valid admin bearer token is required", param="authorization")
