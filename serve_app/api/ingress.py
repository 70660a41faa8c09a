"""The HTTP ingress and the Ray-handle API of raycache.

HTTP routes (FastAPI, see DESIGN "Interfaces"): `POST /v1/completions`,
`POST /v1/chat/completions` (both streamed as server-sent events with `"stream": true`),
`POST /v1/embeddings`, `GET /v1/models`, `GET /v1/cache/stats`, `GET /healthz`, and the admin routes
`POST /v1/models/{model}/version` and `POST /v1/cache/invalidate`. A completion's tenant comes
from its API key (`serve_app.api.auth`); admin routes need `Authorization: Bearer
<admin_token>` and are closed (403) until a token is configured; `/healthz` is open to probes
and names no tenant. The same
operations are methods of `Ingress`, for callers holding a handle (a handle is already inside
the Ray cluster, behind its token authentication: the caller names the tenant, and admin
methods take no token):

    handle = serve.get_app_handle("raycache")
    response = await handle.complete.remote({"model": "tiny-gpt", "prompt": "Hi",
                                             "temperature": 0})
    answer = await handle.chat.remote({"model": "tiny-gpt", "temperature": 0,
                                       "messages": [{"role": "user", "content": "Hi"}]})
    async for chunk in handle.options(stream=True).chat_stream.remote(body):
        ...  # OpenAI's chunk objects, as dicts

Every error a client can cause is a `RaycacheError`: over HTTP it becomes its status code and an
OpenAI-style JSON body naming the field; over a handle it is raised as is.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, TypeVar

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve import metrics as serve_metrics
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle

from cluster.keys import ROUTING_PREFIX_TOKENS, routing_key
from cluster.ray_secret import shared_secret
from cluster.secret import ClusterSecret
from cluster.sharing.directory_actor import directory_actor
from cluster.sharing.redis_probe import RedisProbe
from cluster.versions.actor import version_actor
from cluster.versions.follower import VersionFollower
from cluster.versions.records import ModelVersion, VersionRegression
from cluster.versions.store import VersionStore, eviction_risk
from serve_app.api.admin import parse_invalidation, parse_version_update, publish_update
from serve_app.api.auth import DEFAULT_TENANT, check_admin_token, load_tenant_auth
from serve_app.api.chat import ChatRequest, chat_response, parse_chat_request
from serve_app.api.completions import (
    CompletionJob,
    CompletionOutcome,
    CompletionRequest,
    SamplingFields,
    completion_response,
    parse_completion_request,
)
from serve_app.api.embeddings import (
    EmbeddingJob,
    EmbeddingRequest,
    embedding_response,
    parse_embedding_request,
)
from serve_app.api.grpc_messages import api_key
from serve_app.api.grpc_service import GrpcMethods
from serve_app.api.ingress_cache import IngressCache, Lookup
from serve_app.api.request_body import read_json_body
from serve_app.api.request_metrics import Endpoint, RequestMetrics, cache_outcome
from serve_app.api.streaming import DONE, Kind, StreamChunks, error_event, sse
from serve_app.config import AppArgs, ModelSpec, parse_args, prompt_text
from serve_app.errors import (
    InvalidRequest,
    ModelNotFound,
    PromptTooLong,
    RaycacheError,
    ReplicaUnavailable,
    VersionConflict,
)
from serve_app.models.chat_template import TemplateError
from serve_app.models.loading import (
    load_chat_format,
    load_tokenizer,
    model_context,
    model_dimensions,
    model_vocab,
)
from serve_app.replica.streaming import StreamEnd, StreamEvent, TextPiece, split_pieces
from serve_app.stats import EMPTY as EMPTY_STATS
from serve_app.stats import cluster_stats

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 1024 * 1024
REPLICA_LOST = (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError)
"""What a handle call raises when its replica died or could not be reached under it."""
RequestT = TypeVar("RequestT", bound=SamplingFields)
DIRECTORY_TIMEOUT_S = 5.0

http_app = FastAPI(title="raycache", version="0.1.0")


@http_app.exception_handler(RaycacheError)
async def _raycache_error(_: Request, exc: RaycacheError) -> JSONResponse:
    return JSONResponse(exc.to_json(), status_code=exc.http_status, headers=exc.http_headers())


@http_app.exception_handler(ray.exceptions.RayError)
async def _ray_error(_: Request, exc: ray.exceptions.RayError) -> JSONResponse:
    # A replica or an actor that failed under the request: the client may send it again.
    logger.warning("a request failed in Ray: %s", exc)
    return await _raycache_error(_, ReplicaUnavailable("the request's replica failed"))


@http_app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    error = exc.errors()[0]
    location = [str(part) for part in error["loc"] if part not in ("body", "path", "query")]
    param = ".".join(location) or "body"
    return JSONResponse(InvalidRequest(error["msg"], param=param).to_json(), status_code=400)


async def _json_body(request: Request) -> Any:
    """The request's JSON body; bad or oversized JSON is an `InvalidRequest` on `body`."""
    return await read_json_body(request, MAX_BODY_BYTES)


def _unstreamed(request: RequestT) -> RequestT:
    """`request`, refused when it asks to be streamed (a handle's `*_stream` method does that)."""
    if request.stream:
        raise InvalidRequest(
            "a streamed request goes to complete_stream / chat_stream", param="stream"
        )
    return request


async def _event_stream(chunks: AsyncIterator[dict[str, Any]]) -> Response:
    """`chunks` as server-sent events, ending with `data: [DONE]`. The first chunk is awaited
    here, so a request refused before its answer began gets its error status; an error later
    is sent as an event, and the stream ends."""
    first = await anext(chunks)

    async def events() -> AsyncIterator[bytes]:
        try:
            yield sse(first)
            async for chunk in chunks:
                yield sse(chunk)
            yield DONE
        except RaycacheError as exc:
            yield error_event(exc)
        except ray.exceptions.RayError as exc:
            logger.warning("a stream failed: %s", exc)
            yield error_event(ReplicaUnavailable("the replica failed mid-stream", param="model"))
        finally:
            await chunks.aclose()

    return StreamingResponse(events(), media_type="text/event-stream")


# Everything the class uses must be defined above it: `serve.ingress` serializes the class
# when it decorates it, before the rest of this module has run.
@serve.deployment(name="Ingress")
@serve.ingress(http_app)
class Ingress(GrpcMethods):
    """Parses, validates and routes requests to the `ModelReplica` deployment; its gRPC
    methods are `GrpcMethods`'."""

    def __init__(self, replicas: DeploymentHandle, args: dict[str, Any]) -> None:
        self._args: AppArgs = parse_args(args).with_environment()
        self._replicas = replicas
        # Read from each model's files: the ingress tokenizes, the replicas load the weights.
        self._tokenizers = {spec.id: load_tokenizer(spec) for spec in self._args.models}
        self._chat_formats = {
            spec.id: load_chat_format(spec, self._tokenizers[spec.id]) for spec in self._args.models
        }
        self._contexts = {spec.id: model_context(spec) for spec in self._args.models}
        self._dimensions = {
            spec.id: model_dimensions(spec) for spec in self._args.models if spec.is_encoder
        }
        self._vocabs = {
            spec.id: model_vocab(spec, self._tokenizers[spec.id]) for spec in self._args.models
        }
        self._redis = RedisProbe(self._args.redis_url)
        self._metrics = RequestMetrics(serve_metrics)
        # Before the first request is served: blocking here holds up no request.
        secret = shared_secret(self._args.namespace, self._args.configured_secret())
        self._versions = version_actor(self._args.namespace, self._args.redis_url, secret.records)
        self._cache = self._start_cache(secret) if self._args.ingress_cache.enabled else None
        risk = eviction_risk(self._args.redis_url) if self._args.redis_url else None
        if risk is not None:
            logger.warning("%s", risk)
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
            for pinned in self._args.prefix_cache.pinned:
                if pinned.tenant not in self._auth.tenants:
                    logger.warning(
                        "a pinned prompt of %s belongs to tenant %r, which no API key maps to: "
                        "no request can reuse it (set its `tenant`)",
                        pinned.model,
                        pinned.tenant,
                    )

    # -- handle API ---------------------------------------------------------------------------

    async def complete(self, body: dict[str, Any], tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        """Answer an OpenAI completion body (not streamed: see `complete_stream`); raises
        `RaycacheError` on bad input."""
        started = time.perf_counter()
        return await self._complete(parse_completion_request(body), tenant, started)

    async def _complete(
        self, request: CompletionRequest, tenant: str, started: float
    ) -> dict[str, Any]:
        """`complete` of a parsed body that arrived at `started`."""
        request = _unstreamed(request)
        job = self._completion_job(request, tenant)
        outcome = await self._completion(job)
        response = completion_response(request.model, outcome)
        return self._answered("completions", response, started, job.tenant_label)

    async def complete_stream(
        self, body: dict[str, Any], tenant: str = DEFAULT_TENANT
    ) -> AsyncIterator[dict[str, Any]]:
        """A completion body's answer as OpenAI's stream chunks (`handle.options(stream=True)`);
        raises `RaycacheError` on bad input, before the first chunk."""
        request = parse_completion_request(body)
        job = self._completion_job(request, tenant)
        async for chunk in self._chunks("completions", request, job):
            yield chunk

    async def chat(self, body: dict[str, Any], tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        """Answer an OpenAI chat completion body (not streamed: see `chat_stream`); raises
        `RaycacheError` on bad input."""
        started = time.perf_counter()
        return await self._chat(parse_chat_request(body), tenant, started)

    async def _chat(self, request: ChatRequest, tenant: str, started: float) -> dict[str, Any]:
        """`chat` of a parsed body that arrived at `started`."""
        request = _unstreamed(request)
        job = await self._chat_job(request, tenant)
        outcome = await self._completion(job)
        response = chat_response(request.model, outcome)
        return self._answered("chat", response, started, job.tenant_label)

    async def chat_stream(
        self, body: dict[str, Any], tenant: str = DEFAULT_TENANT
    ) -> AsyncIterator[dict[str, Any]]:
        """A chat body's answer as OpenAI's `chat.completion.chunk`s
        (`handle.options(stream=True)`); raises `RaycacheError` before the first chunk."""
        request = parse_chat_request(body)
        job = await self._chat_job(request, tenant)
        async for chunk in self._chunks("chat", request, job):
            yield chunk

    async def embeddings(
        self, body: dict[str, Any], tenant: str = DEFAULT_TENANT
    ) -> dict[str, Any]:
        """Embed an OpenAI embeddings body's inputs, each cached on its own; raises
        `RaycacheError` on bad input."""
        started = time.perf_counter()
        request = parse_embedding_request(body)
        job = self._embedding_job(request, tenant)
        outcomes = await self._on_a_replica(self._replicas.embed, job)
        response = embedding_response(request.model, outcomes, request.encoding_format)
        return self._answered("embeddings", response, started, job.tenant_label)

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
        if spec.is_hf and update.seed is not None:
            raise InvalidRequest(
                "a Hugging Face model's versions are checkpoint directories, not seeds",
                param="seed",
            )
        if spec.kind == "tiny-encoder" and update.checkpoint is not None:
            raise InvalidRequest("a tiny-encoder's versions are seeds", param="checkpoint")
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
        """`{"total": ..., "replicas": {replica_id: ...}, "ingress": ...}`: as last reported by
        each replica, and this ingress replica's own cache now."""
        directory = directory_actor(self._args.namespace)
        replicas = await directory.stats.remote()
        return cluster_stats(replicas, self._cache.cache.stats() if self._cache else EMPTY_STATS)

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
    async def http_completions(self, request: Request) -> Response:
        tenant = self._tenant(request)
        body = await _json_body(request)
        started = time.perf_counter()  # as `complete` counts: from the body, not its upload
        parsed = parse_completion_request(body)
        if not parsed.stream:
            return JSONResponse(await self._complete(parsed, tenant, started))
        job = self._completion_job(parsed, tenant)
        return await _event_stream(self._chunks("completions", parsed, job))

    @http_app.post("/v1/chat/completions")
    async def http_chat(self, request: Request) -> Response:
        tenant = self._tenant(request)
        body = await _json_body(request)
        started = time.perf_counter()  # as `chat` counts: from the body, not its upload
        parsed = parse_chat_request(body)
        if not parsed.stream:
            return JSONResponse(await self._chat(parsed, tenant, started))
        job = await self._chat_job(parsed, tenant)
        return await _event_stream(self._chunks("chat", parsed, job))

    @http_app.post("/v1/embeddings")
    async def http_embeddings(self, request: Request) -> JSONResponse:
        tenant = self._tenant(request)
        return JSONResponse(await self.embeddings(await _json_body(request), tenant=tenant))

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

    def _start_cache(self, secret: ClusterSecret) -> IngressCache:
        """The ingress cache, following versions as a subscriber of the version actor from the
        ones it holds now (blocking: called before the first request)."""
        try:
            current: dict[str, ModelVersion] = ray.get(
                self._versions.current.remote(), timeout=DIRECTORY_TIMEOUT_S
            )
        except (ray.exceptions.RayError, TimeoutError):
            current = {}  # heard from the actor's first answer to the follower
        cache = IngressCache(
            self._args.ingress_cache,
            self._args.result_cache,
            self._args.namespace,
            secret,
            initial=current,
        )
        replica = serve.get_replica_context().replica_id.unique_id
        self._follower = VersionFollower(
            f"ingress-{replica}",
            actor=lambda: self._versions,
            initial=current,
            apply_version=cache.apply_version,
            apply_rules=cache.apply_rules,
            holds_weights=False,
            store=(
                VersionStore(self._args.redis_url, self._args.namespace, secret.records)
                if self._args.redis_url
                else None
            ),
        )
        cache.connect(self._follower)
        self._follower.start()
        return cache

    async def __del__(self) -> None:
        """Serve's shutdown hook: hand the tallied counts to Ray, and stop following versions
        (unsubscribing, off the loop)."""
        metrics = getattr(self, "_metrics", None)
        if metrics is not None:
            metrics.hand_over()
        follower = getattr(self, "_follower", None)
        if follower is not None:
            await asyncio.to_thread(follower.stop)

    def _cached(self, job: CompletionJob) -> tuple[Lookup | None, CompletionOutcome | None]:
        """Where `job`'s answer is kept at the ingress (None when it may not be), and the
        answer kept there (None when there is none)."""
        cache = self._cache
        lookup = cache.lookup(job) if cache is not None else None
        if cache is None or lookup is None:
            return None, None
        kept = cache.get(lookup)
        self._metrics.looked_up(job.model, kept is not None, tenant=job.tenant_label)
        return lookup, kept

    def _keep(self, lookup: Lookup | None, outcome: CompletionOutcome) -> None:
        if lookup is not None and self._cache is not None:
            self._cache.put(lookup, outcome)

    async def _completion(self, job: CompletionJob) -> CompletionOutcome:
        """`job`'s answer: kept at the ingress, or from a replica (and then kept)."""
        lookup, kept = self._cached(job)
        if kept is not None:
            return kept
        outcome: CompletionOutcome = await self._on_a_replica(self._replicas.complete, job)
        self._keep(lookup, outcome)
        return outcome

    async def _on_a_replica(
        self, method: DeploymentHandle, job: CompletionJob | EmbeddingJob
    ) -> Any:
        """`method(job)`'s answer from a replica. A replica that dies under a deterministic job
        (an embedding, a greedy or seeded completion) costs the client nothing: the job runs
        once more, on another replica (Serve's router stops choosing the dead one), as its
        answer cannot differ. A sampled job, or a second failure, is a `ReplicaUnavailable`
        (503, with `Retry-After`)."""
        try:
            return await method.remote(job)
        except REPLICA_LOST as exc:
            self._run_again(job, exc)
        try:
            return await method.remote(job)
        except REPLICA_LOST as exc:
            raise ReplicaUnavailable("the request's replica failed, twice") from exc

    def _run_again(self, job: CompletionJob | EmbeddingJob, exc: Exception) -> None:
        """`job`'s replica died under it (`exc`): count and log the run to come, or raise
        `ReplicaUnavailable` for a sampled job, which is not run again."""
        if isinstance(job, CompletionJob) and not job.params.is_deterministic:
            raise ReplicaUnavailable("the request's replica failed") from exc
        logger.warning("a replica failed under a request; running it once more: %s", exc)
        self._metrics.retried(job.model)

    def _answered(
        self, endpoint: Endpoint, response: dict[str, Any], started: float, tenant_label: str
    ) -> dict[str, Any]:
        """`response`, its latency recorded."""
        cache = cache_outcome(response["cache"])
        seconds = time.perf_counter() - started
        self._metrics.answered(response["model"], endpoint, cache, seconds, tenant=tenant_label)
        return response

    def _tenant(self, request: Request) -> str:
        return self._auth.tenant_of(
            request.headers.get("authorization"), request.headers.get(self._args.auth.tenant_header)
        )

    def _grpc_tenant(self, context: RayServegRPCContext) -> str:
        metadata = context.invocation_metadata()
        header = self._args.auth.tenant_header.lower()
        claimed = next((value for key, value in metadata if key.lower() == header), None)
        return self._auth.tenant_of(api_key(metadata), claimed)

    async def _chunks(
        self, kind: Kind, request: SamplingFields, job: CompletionJob
    ) -> AsyncIterator[dict[str, Any]]:
        """The chunks of `job`'s streamed answer. The replica's first event is awaited before
        any chunk is yielded, so that a refusal (a model loading, say) is raised, not streamed,
        and so that a deterministic job whose replica dies before its first event runs once
        more, as `_on_a_replica` does (once text was sent, a stream cannot be resumed)."""
        started = time.perf_counter()
        chunks = StreamChunks(kind, request.model, request.include_usage)
        lookup, kept = self._cached(job)
        if kept is not None:
            for chunk in chunks.opening():
                yield chunk
            if kept.text:
                seconds = time.perf_counter() - started
                self._metrics.first_token(job.model, kind, seconds, tenant=job.tenant_label)
            for piece in split_pieces(kept.text, kept.pieces):
                yield chunks.piece(piece)
            for chunk in chunks.ending(kept):
                yield chunk
            seconds = time.perf_counter() - started
            self._metrics.answered(job.model, kind, "ingress", seconds, tenant=job.tenant_label)
            return
        events = self._events(job)
        try:
            try:
                event = await anext(events)
            except REPLICA_LOST as exc:
                self._run_again(job, exc)
                await events.aclose()
                events = self._events(job)
                event = await anext(events)
            for chunk in chunks.opening():
                yield chunk
            first = True
            while isinstance(event, TextPiece):
                if first:
                    seconds = time.perf_counter() - started
                    self._metrics.first_token(job.model, kind, seconds, tenant=job.tenant_label)
                    first = False
                yield chunks.piece(event.text)
                event = await anext(events)
            assert isinstance(event, StreamEnd)
            self._keep(lookup, event.outcome)
            for chunk in chunks.ending(event.outcome):
                yield chunk
            cache = event.outcome.cache_tier or "miss"
            seconds = time.perf_counter() - started
            self._metrics.answered(job.model, kind, cache, seconds, tenant=job.tenant_label)
        except StopAsyncIteration:
            raise ReplicaUnavailable("the replica ended the stream early", param="model") from None
        finally:
            await events.aclose()

    async def _events(self, job: CompletionJob) -> AsyncIterator[StreamEvent]:
        """The replica's stream of `job`; leaving it early cancels the replica's side."""
        stream = self._replicas.options(stream=True).stream.remote(job)
        try:
            async for event in stream:
                yield event
        finally:
            stream.cancel()

    def _completion_job(self, request: CompletionRequest, tenant: str) -> CompletionJob:
        spec = self._spec(request.model)
        tokenizer = self._tokenizers[spec.id]
        if isinstance(request.prompt, str):
            tokens = tokenizer.encode(prompt_text(request.prompt, self._args))
        else:
            tokens = list(request.prompt)
            vocab = self._vocabs[spec.id]
            bad = next((t for t in tokens if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidRequest(
                    f"token id {bad} is outside the vocabulary [0, {vocab})",
                    param="prompt",
                )
        return self._job(spec.id, request, tenant, tokens, "prompt")

    async def _chat_job(self, request: ChatRequest, tenant: str) -> CompletionJob:
        spec = self._spec(request.model)
        chat_format = self._chat_formats[spec.id]
        if chat_format is None:
            raise InvalidRequest(
                f"model {spec.id!r} has no chat template; use /v1/completions", param="model"
            )
        messages = [
            replace(m, content=prompt_text(m.content, self._args)) for m in request.chat_messages()
        ]
        try:
            # Rendering runs the template once per message: off the ingress's event loop.
            prompt = await asyncio.to_thread(chat_format.prompt, messages)
        except TemplateError as exc:
            raise InvalidRequest(str(exc), param="messages") from None
        # Routed by the conversation's opening, which every turn repeats: the turns meet the
        # replica holding the conversation so far.
        job = self._job(spec.id, request, tenant, prompt.tokens, "messages", prompt.opening)
        return replace(job, answer_end=chat_format.answer_end)

    def _embedding_job(self, request: EmbeddingRequest, tenant: str) -> EmbeddingJob:
        spec = self._spec(request.model, embeds=True)
        if request.dimensions is not None and request.dimensions != self._dimensions[spec.id]:
            raise InvalidRequest(
                f"model {spec.id!r} embeds in {self._dimensions[spec.id]} dimensions only",
                param="dimensions",
            )
        tokenizer, vocab = self._tokenizers[spec.id], self._vocabs[spec.id]
        longest = self._contexts[spec.id]
        given_inputs = request.inputs()
        single = isinstance(request.input, str) or isinstance(request.input[0], int)
        inputs: list[tuple[int, ...]] = []
        for i, given in enumerate(given_inputs):
            field = "input" if single else f"input[{i}]"
            if isinstance(given, str):
                tokens = tokenizer.encode(prompt_text(given, self._args))
            else:
                tokens = given
            if not tokens:
                raise InvalidRequest("must not be empty", param=field)
            bad = next((t for t in tokens if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidRequest(
                    f"token id {bad} is outside the vocabulary [0, {vocab})", param=field
                )
            if len(tokens) > longest:
                raise PromptTooLong(
                    f"has {len(tokens)} tokens; the limit for model {spec.id!r} is {longest}",
                    param=field,
                )
            inputs.append(tuple(tokens))
        keys = tuple(
            routing_key(self._args.namespace, tenant, spec.id, tokens) for tokens in inputs
        )
        return EmbeddingJob(
            spec.id,
            tenant,
            tuple(inputs),
            keys,
            routing_key=keys[0],
            tenant_label=self._auth.tenant_label(tenant),
        )

    def _spec(self, model: str, embeds: bool = False) -> ModelSpec:
        spec = self._args.model(model)
        if spec is None:
            raise ModelNotFound(f"model {model!r} does not exist", param="model")
        if spec.is_encoder and not embeds:
            raise InvalidRequest(
                f"model {model!r} is an encoder; ask /v1/embeddings", param="model"
            )
        if embeds and not spec.is_encoder:
            raise InvalidRequest(f"model {model!r} does not embed", param="model")
        return spec

    def _job(
        self,
        model: str,
        request: SamplingFields,
        tenant: str,
        tokens: list[int],
        prompt_field: str,
        routing_tokens: int = ROUTING_PREFIX_TOKENS,
    ) -> CompletionJob:
        """The job of a validated request whose prompt is `tokens` (from `prompt_field`),
        placed by its first `routing_tokens` (at most `ROUTING_PREFIX_TOKENS`)."""
        limit = self._args.limits.max_completion_tokens
        asked = request.completion_limit()
        max_tokens = limit if asked is None else asked
        if not 1 <= max_tokens <= limit:
            field = "max_completion_tokens" if isinstance(request, ChatRequest) else "max_tokens"
            if isinstance(request, ChatRequest) and request.max_tokens is not None:
                field = "max_tokens"
            raise InvalidRequest(f"must be between 1 and {limit}, got {max_tokens}", param=field)
        if not tokens:
            raise InvalidRequest("must not be empty", param=prompt_field)
        # At least one position must remain for the first generated token.
        longest = self._contexts[model] - 1
        if self._args.limits.max_prompt_tokens is not None:
            longest = min(longest, self._args.limits.max_prompt_tokens)
        if len(tokens) > longest:
            raise PromptTooLong(
                f"has {len(tokens)} tokens; the limit for model {model!r} is {longest}",
                param=prompt_field,
            )
        return CompletionJob(
            model=model,
            tenant=tenant,
            prompt_tokens=tuple(tokens),
            params=request.sampling_params(max_tokens),
            routing_key=routing_key(
                self._args.namespace,
                tenant,
                model,
                tokens,
                min(routing_tokens, ROUTING_PREFIX_TOKENS),
            ),
            tenant_label=self._auth.tenant_label(tenant),
        )
