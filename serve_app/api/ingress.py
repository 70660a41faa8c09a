"""The HTTP ingress and the Ray-handle API of raycache.

HTTP routes (FastAPI, see DESIGN "Interfaces"): `POST /v1/completions`, `GET /v1/models`,
`GET /v1/cache/stats`, `GET /healthz`, and the admin routes `POST /v1/models/{model}/version`
and `POST /v1/cache/invalidate`. A completion's tenant comes from its API key
(`serve_app.api.auth`); admin routes need `Authorization: Bearer <admin_token>` and are closed
(403) until a token is configured; `/healthz` is open to probes and names no tenant. The same
operations are methods of `Ingress`, for callers holding a handle (a handle is already inside
the Ray cluster, behind its token authentication: the caller names the tenant, and admin
methods take no token):

    handle = serve.get_app_handle("raycache")
    response = await handle.complete.remote({"model": "tiny-gpt", "prompt": "Hi",
                                             "temperature": 0})

Every error a client can cause is a `RaycacheError`: over HTTP it becomes its status code and an
OpenAI-style JSON body naming the field; over a handle it is raised as is.
"""

import logging
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.keys import routing_key
from cluster.ray_secret import shared_secret
from cluster.sharing.directory_actor import directory_actor
from cluster.sharing.redis_probe import RedisProbe
from cluster.versions.actor import version_actor
from cluster.versions.records import VersionRegression
from serve_app.api.admin import parse_invalidation, parse_version_update, publish_update
from serve_app.api.auth import DEFAULT_TENANT, check_admin_token, load_tenant_auth
from serve_app.api.completions import (
    CompletionJob,
    CompletionRequest,
    completion_response,
    parse_completion_request,
)
from serve_app.api.request_body import read_json_body
from serve_app.config import AppArgs, parse_args, prompt_text
from serve_app.errors import (
    InvalidRequest,
    ModelNotFound,
    PromptTooLong,
    RaycacheError,
    VersionConflict,
)
from serve_app.models.loading import load_tokenizer, model_context, model_vocab
from serve_app.stats import cluster_stats

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 1024 * 1024
DIRECTORY_TIMEOUT_S = 5.0

http_app = FastAPI(title="raycache", version="0.1.0")


@http_app.exception_handler(RaycacheError)
async def _raycache_error(_: Request, exc: RaycacheError) -> JSONResponse:
    return JSONResponse(exc.to_json(), status_code=exc.http_status)


@http_app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    error = exc.errors()[0]
    location = [str(part) for part in error["loc"] if part not in ("body", "path", "query")]
    param = ".".join(location) or "body"
    return JSONResponse(InvalidRequest(error["msg"], param=param).to_json(), status_code=400)


async def _json_body(request: Request) -> Any:
    """The request's JSON body; bad or oversized JSON is an `InvalidRequest` on `body`."""
    return await read_json_body(request, MAX_BODY_BYTES)


# Everything the class uses must be defined above it: `serve.ingress` serializes the class
# when it decorates it, before the rest of this module has run.
@serve.deployment(name="Ingress")
@serve.ingress(http_app)
class Ingress:
    """Parses, validates and routes requests to the `ModelReplica` deployment."""

    def __init__(self, replicas: DeploymentHandle, args: dict[str, Any]) -> None:
        self._args: AppArgs = parse_args(args).with_environment()
        self._replicas = replicas
        # Read from each model's files: the ingress tokenizes, the replicas load the weights.
        self._tokenizers = {spec.id: load_tokenizer(spec) for spec in self._args.models}
        self._contexts = {spec.id: model_context(spec) for spec in self._args.models}
        self._vocabs = {
            spec.id: model_vocab(spec, self._tokenizers[spec.id]) for spec in self._args.models
        }
        self._redis = RedisProbe(self._args.redis_url)
        # Before the first request is served: blocking here holds up no request.
        secret = shared_secret(self._args.namespace, self._args.configured_secret())
        self._versions = version_actor(self._args.namespace, self._args.redis_url, secret.records)
        self._auth = load_tenant_auth(self._args.auth)
        if self._auth.mode == "single_tenant":
            logger.warning(
                "no API keys configured: single-tenant, every request is tenant %r "
                "(set auth.api_keys_file or RAYCACHE_API_KEYS for tenants)",
                DEFAULT_TENANT,
            )
        if self._args.admin_token is None:
            logger.warning("no admin token configured: admin routes are closed (403)")
        if self._auth.mode == "api_keys":
            tenants = set(self._auth.keys.values())
            for pinned in self._args.prefix_cache.pinned:
                if pinned.tenant not in tenants:
                    logger.warning(
                        "a pinned prompt of %s belongs to tenant %r, which no API key maps to: "
                        "no request can reuse it (set its `tenant`)",
                        pinned.model,
                        pinned.tenant,
                    )

    # -- handle API ---------------------------------------------------------------------------

    async def complete(self, body: dict[str, Any], tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        """Answer an OpenAI-style completion body; raises `RaycacheError` on bad input."""
        request = parse_completion_request(body)
        job = self._job(request, tenant)
        outcome = await self._replicas.complete.remote(job)
        return completion_response(request.model, outcome)

    async def models(self) -> dict[str, Any]:
        """The OpenAI model list, with each model's current `version` (the configured one
        until a version is published)."""
        try:
            current = await self._versions.current.remote()
        except ray.exceptions.RayError:
            current = {}
        data = []
        for spec in self._args.models:
            record = current.get(spec.id)
            data.append(
                {
                    "id": spec.id,
                    "object": "model",
                    "owned_by": "raycache",
                    "version": record.version if record else spec.version,
                    "generation": record.generation if record else 0,
                }
            )
        return {"object": "list", "data": data}

    async def publish_version(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        """Roll out a new version of `model` (body: `version`, optional `seed` or `checkpoint`,
        `force`, `timeout_s`); returns who acknowledged. Raises `RaycacheError`."""
        spec = self._args.model(model)
        if spec is None:
            raise ModelNotFound(f"model {model!r} does not exist", param="model")
        update = parse_version_update(body, self._args.checkpoint_dir, spec.kind)
        if spec.kind == "hf" and update.seed is not None:
            raise InvalidRequest(
                "a Hugging Face model's versions are checkpoint directories, not seeds",
                param="seed",
            )
        try:
            outcome = await publish_update(
                self._versions, model, update, source="admin", timeout_s=update.timeout_s
            )
        except VersionRegression as exc:
            raise VersionConflict(str(exc.args[0] if exc.args else exc), param="version") from None
        return {"object": "model.version", **outcome.as_json()}

    async def invalidate(self, body: dict[str, Any]) -> dict[str, Any]:
        """Invalidate cached answers by `model`, `version`, `tenant` and/or `key` on every
        replica and in Redis; returns who acknowledged. Raises `RaycacheError`."""
        request = parse_invalidation(body)
        if request.model is not None and self._args.model(request.model) is None:
            raise ModelNotFound(f"model {request.model!r} does not exist", param="model")
        outcome = await self._versions.invalidate.remote(
            model=request.model,
            version=request.version,
            tenant=request.tenant,
            key=request.key,
            timeout_s=request.timeout_s,
        )
        return {
            "object": "cache.invalidation",
            "selector": request.model_dump(exclude={"timeout_s"}, exclude_none=True),
            "acknowledged": list(outcome.acknowledged),
            "missing": list(outcome.missing),
        }

    async def cache_stats(self) -> dict[str, Any]:
        """`{"total": ..., "replicas": {replica_id: ...}}` as last reported by each replica."""
        directory = directory_actor(self._args.namespace)
        replicas = await directory.stats.remote()
        return cluster_stats(replicas)

    async def health(self) -> dict[str, Any]:
        """`{"status": "ok", "redis": "up" | "down" | "disabled", "replicas": n, "auth": ...}`;
        `auth` is `api_keys`, `single_tenant` or `trusted_header`."""
        try:
            members = await directory_actor(self._args.namespace).members.remote()
            replica_count: int | None = len(members)
        except ray.exceptions.RayError:
            replica_count = None
        return {
            "status": "ok",
            "redis": await self._redis.status(),
            "replicas": replica_count,
            "models": [m.id for m in self._args.models],
            "auth": self._auth.mode,
            "admin": "open" if self._args.admin_token is not None else "closed",
        }

    # -- HTTP routes --------------------------------------------------------------------------

    @http_app.post("/v1/completions")
    async def http_completions(self, request: Request) -> JSONResponse:
        tenant = self._auth.tenant_of(
            request.headers.get("authorization"), request.headers.get(self._args.auth.tenant_header)
        )
        body = await _json_body(request)
        return JSONResponse(await self.complete(body, tenant=tenant))

    @http_app.get("/v1/models")
    async def http_models(self) -> JSONResponse:
        return JSONResponse(await self.models())

    @http_app.post("/v1/models/{model}/version")
    async def http_publish_version(self, model: str, request: Request) -> JSONResponse:
        check_admin_token(request.headers.get("authorization"), self._args.admin_token)
        return JSONResponse(await self.publish_version(model, await _json_body(request)))

    @http_app.post("/v1/cache/invalidate")
    async def http_invalidate(self, request: Request) -> JSONResponse:
        check_admin_token(request.headers.get("authorization"), self._args.admin_token)
        return JSONResponse(await self.invalidate(await _json_body(request)))

    @http_app.get("/v1/cache/stats")
    async def http_cache_stats(self) -> JSONResponse:
        return JSONResponse(await self.cache_stats())

    @http_app.get("/healthz")
    async def http_health(self) -> JSONResponse:
        return JSONResponse(await self.health())

    # -- helpers ------------------------------------------------------------------------------

    def _job(self, request: CompletionRequest, tenant: str) -> CompletionJob:
        spec = self._args.model(request.model)
        if spec is None:
            raise ModelNotFound(f"model {request.model!r} does not exist", param="model")
        limit = self._args.limits.max_completion_tokens
        if not 1 <= request.max_tokens <= limit:
            raise InvalidRequest(
                f"must be between 1 and {limit}, got {request.max_tokens}", param="max_tokens"
            )
        tokenizer = self._tokenizers[spec.id]
        if isinstance(request.prompt, str):
            tokens = tokenizer.encode(prompt_text(request.prompt, self._args))
        else:
            tokens = list(request.prompt)
        if not tokens:
            raise InvalidRequest("must not be empty", param="prompt")
        # At least one position must remain for the first generated token.
        longest = self._contexts[spec.id] - 1
        if self._args.limits.max_prompt_tokens is not None:
            longest = min(longest, self._args.limits.max_prompt_tokens)
        if len(tokens) > longest:
            raise PromptTooLong(
                f"has {len(tokens)} tokens; the limit for model {spec.id!r} is {longest}",
                param="prompt",
            )
        if not isinstance(request.prompt, str):
            vocab = self._vocabs[spec.id]
            bad = next((t for t in tokens if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidRequest(
                    f"token id {bad} is outside the vocabulary [0, {vocab})",
                    param="prompt",
                )
        return CompletionJob(
            model=spec.id,
            tenant=tenant,
            prompt_tokens=tuple(tokens),
            params=request.sampling_params(),
            routing_key=routing_key(self._args.namespace, tenant, spec.id, tokens),
        )
