"""Validated `args` of the raycache Serve application.

`build_app(args)` receives the `args` mapping of an application in a Serve config file. Ray Serve
passes it through untouched, so every key is checked here: unknown keys are rejected with a
message naming them (Serve itself would ignore a misspelt option silently), and each field
carries its unit, default and meaning.
"""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from cluster.keys import normalize_text
from cluster.local.policies import DEFAULT_POLICY, policy_names
from cluster.secret import MIN_SECRET_CHARS, ClusterSecret, SecretError, is_placeholder

REDIS_URL_ENV = "RAYCACHE_REDIS_URL"
ADMIN_TOKEN_ENV = "RAYCACHE_ADMIN_TOKEN"
HMAC_SECRET_ENV = "RAYCACHE_HMAC_SECRET"
API_KEYS_ENV = "RAYCACHE_API_KEYS"
MAX_SEED = 2**63 - 1
"""Largest weight seed: what torch.manual_seed and the checkpoint records hold (int64)."""
# What a bearer token may hold: HTTP clients send header values as ASCII (httpx refuses
# anything else) and servers read them as Latin-1, so any other character could never match.
BEARER_TOKEN_CHARS = re.compile(r"[!-~]+")


class StrictModel(BaseModel):
    """A frozen pydantic model that rejects unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(StrictModel):
    """One model the replicas serve."""

    id: str = Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]*$",
        description="Model name clients send in `model`; also part of cache keys.",
    )
    version: str = Field(
        default="1",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]*$",
        description="Version of the weights; answers are cached under it.",
    )
    kind: Literal["tiny-gpt", "hf", "tiny-encoder", "hf-encoder"] = Field(
        default="tiny-gpt",
        description="Model family: `tiny-gpt`, the built-in byte-level GPT; `hf`, a Hugging Face "
        "causal LM in a local directory (`path`); `tiny-encoder`, the built-in byte-level "
        "sentence encoder; `hf-encoder`, a Hugging Face encoder (BERT-like) in a local directory, "
        "mean-pooled. Encoders answer `/v1/embeddings`, the others completions and chat.",
    )
    path: str | None = Field(
        default=None,
        description="For `kind: hf`: the checkpoint directory (`config.json`, safetensors "
        "weights, `tokenizer.json`, as `save_pretrained` writes them).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32",
        description="For `kind: hf`: the dtype the weights are loaded in, and of cached blocks.",
    )
    seed: int = Field(
        default=0,
        ge=0,
        le=MAX_SEED,
        description="Seed the weights are built from when no checkpoint is given.",
    )
    checkpoint: str | None = Field(
        default=None,
        description="Path of a safetensors checkpoint written by raycache; overrides `seed`.",
    )
    n_layers: int = Field(default=4, ge=1, le=64, description="Transformer blocks.")
    d_model: int = Field(default=256, ge=8, le=8192, description="Width of the residual stream.")
    n_heads: int = Field(default=4, ge=1, le=128, description="Attention heads per block.")
    max_context: int = Field(
        default=4096, ge=16, le=65536, description="Longest sequence (prompt + completion), tokens."
    )
    pinned: bool = Field(
        default=False,
        description="Keep the model loaded on every replica: loaded at start, never evicted to "
        "make room for another model (see `model_pool`).",
    )

    @model_validator(mode="after")
    def _fields_of_the_kind(self) -> ModelSpec:
        if self.is_hf:
            if self.path is None:
                raise ValueError(f"a model of kind `{self.kind}` needs `path`, its directory")
            if not os.path.isabs(self.path):
                raise ValueError(
                    "`path` must be absolute: each replica reads it on its own node, from its "
                    "own working directory"
                )
            # Compared with the defaults, not with the fields given: a spec dumped and parsed
            # again (as the environment overrides do) names every field.
            fields = type(self).model_fields
            shaped = {
                name for name in _TINY_GPT_FIELDS if getattr(self, name) != fields[name].default
            }
            if shaped:
                raise ValueError(
                    f"{sorted(shaped)} describe a built-in model; a `{self.kind}` model takes "
                    "its shape from its config.json"
                )
            return self
        if self.path is not None or self.dtype != "float32":
            raise ValueError("`path` and `dtype` are for Hugging Face models")
        if self.kind == "tiny-encoder" and self.checkpoint is not None:
            raise ValueError("a tiny-encoder is built from its `seed`; it takes no checkpoint")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})"
            )
        return self

    @property
    def is_hf(self) -> bool:
        """Whether the model is a Hugging Face checkpoint directory (`path`)."""
        return self.kind in ("hf", "hf-encoder")

    @property
    def is_encoder(self) -> bool:
        """Whether the model embeds (`/v1/embeddings`) rather than generates."""
        return self.kind in ("tiny-encoder", "hf-encoder")


_TINY_GPT_FIELDS = frozenset(
    {"seed", "checkpoint", "n_layers", "d_model", "n_heads", "max_context"}
)


class ResultCacheSettings(StrictModel):
    """Each replica's local result cache."""

    max_bytes: int = Field(
        default=64 * 1024 * 1024, ge=0, description="Byte budget of cached answers (bytes)."
    )
    max_entries: int = Field(default=100_000, ge=0, description="Most answers kept (entries).")
    policy: str = Field(
        default=DEFAULT_POLICY,
        description=f"Eviction policy, one of {policy_names()}; `{DEFAULT_POLICY}` adapts to "
        "recency- and frequency-heavy workloads.",
    )
    ttl_s: float | None = Field(
        default=3600.0, gt=0, description="Lifetime of a cached answer (seconds); null: forever."
    )
    ttl_jitter: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="Each lifetime is drawn from ttl_s * (1 ± ttl_jitter), so that entries "
        "written together do not expire together (fraction).",
    )

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, policy: str) -> str:
        if policy not in policy_names():
            raise ValueError(f"unknown policy {policy!r}; choose one of {policy_names()}")
        return policy

    def longest_life_s(self) -> float:
        """The longest an answer stays cached (its TTL stretched by the jitter; a year when
        answers do not expire): how long an invalidation rule matters."""
        if self.ttl_s is None:
            return 365 * 24 * 3600.0
        return self.ttl_s * (1 + self.ttl_jitter)


class IngressCacheSettings(StrictModel):
    """The ingress's own cache of deterministic completions, answered without the hop to a
    replica (fenced by versions and invalidations as the replicas' caches are; it takes their
    policy and lifetime from `result_cache`)."""

    enabled: bool = Field(
        default=True, description="Answer repeated deterministic completions at the ingress."
    )
    max_bytes: int = Field(
        default=32 * 1024 * 1024,
        ge=0,
        description="Byte budget of the answers each ingress replica keeps (bytes).",
    )
    max_entries: int = Field(default=50_000, ge=0, description="Most answers kept (entries).")


class PinnedPrompt(StrictModel):
    """A prompt prefix (a system prompt) computed at start-up and never evicted."""

    model: str = Field(description="Id of the model whose prefix cache holds it.")
    text: str = Field(min_length=1, description="The prefix text; only whole blocks are kept.")
    tenant: str = Field(default="default", description="Tenant whose requests may reuse it.")


class PrefixCacheSettings(StrictModel):
    """Each replica's local cache of prompt-prefix key/value blocks."""

    enabled: bool = Field(default=True, description="Reuse cached prefix blocks in prefill.")
    block_size: int = Field(
        default=16, ge=1, le=1024, description="Tokens per cached block (tokens)."
    )
    max_bytes: int = Field(
        default=256 * 1024 * 1024, ge=0, description="Byte budget of cached blocks (bytes)."
    )
    redis_chunk_blocks: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="Blocks per Redis value when prefixes are shared through Redis (blocks).",
    )
    share_new_tokens: int = Field(
        default=1024,
        ge=1,
        description="A prompt's blocks go to Redis on their second use; a request that "
        "computes at least this many of its prompt's tokens writes them at once, as such a "
        "prefill costs more than the write (tokens).",
    )
    peer_chunk_bytes: int = Field(
        default=1024 * 1024,
        ge=1,
        le=32 * 1024 * 1024,
        description="Size of a value an owner replica sends a peer that fetches a prefix "
        "(bytes): as many blocks as fit, at least one. Fewer, larger values mean fewer "
        "signatures to check; smaller ones reach the reader sooner.",
    )
    pinned: tuple[PinnedPrompt, ...] = Field(
        default=(), description="Prefixes computed at start-up and never evicted."
    )


class SharedWriteSettings(StrictModel):
    """How much each tenant may write to the shared tiers (Redis, owner replicas) from one
    replica: answers and prefix blocks past the budget stay in the local caches only."""

    tenant_bytes_per_s: float | None = Field(
        default=64 * 1024 * 1024,
        gt=0,
        description="Bytes per second each tenant's writes may average (bytes/s); null: no cap.",
    )
    tenant_burst_bytes: int = Field(
        default=256 * 1024 * 1024,
        gt=0,
        description="Bytes a tenant may write at once after a quiet spell (bytes).",
    )


class ModelPoolSettings(StrictModel):
    """How many models each replica holds in memory at once; the least recently used idle
    model is evicted to load another (null: no bound)."""

    max_loaded_models: int | None = Field(
        default=None, ge=1, description="Most models loaded at once on one replica."
    )
    max_model_bytes: int | None = Field(
        default=None,
        ge=1,
        description="Most bytes of weights loaded at once on one replica (bytes).",
    )
    load_wait_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="How long a request for a model that is not loaded waits for room (while "
        "every loaded model is in use) and for the load, before failing with 503 (seconds).",
    )


class PeerSettings(StrictModel):
    """Replica-to-replica fetches from the owner of a key."""

    enabled: bool = Field(default=True, description="Ask the owner replica on a local miss.")
    timeout_s: float = Field(
        default=0.2, gt=0, le=10, description="Deadline of one peer fetch (seconds)."
    )


class LimitSettings(StrictModel):
    """Request limits enforced at the ingress."""

    max_prompt_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Longest accepted prompt (tokens); the model's context bounds it regardless.",
    )
    max_completion_tokens: int = Field(
        default=512, ge=1, description="Largest accepted `max_tokens` (tokens)."
    )


class AuthSettings(StrictModel):
    """Who a client is: tenants come from credentials, never from what a client claims."""

    api_keys_file: str | None = Field(
        default=None,
        description="File of API keys, one `tenant:key` (or `tenant:sha256:<hex of the key's "
        f"SHA-256>`) a line, `#` comments; read on each ingress node. {API_KEYS_ENV} "
        "(`tenant:key,tenant:key`) adds more. With any key configured, a request without a "
        "valid `Authorization: Bearer <key>` gets 401; with none, the cluster is single-tenant "
        "(`default`).",
    )
    trust_tenant_header: bool = Field(
        default=False,
        description="Take the tenant from `tenant_header` when a request carries it. Only "
        "behind a gateway that authenticates clients and sets the header itself.",
    )
    tenant_header: str = Field(
        default="x-raycache-tenant",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9-]+$",
        description="The header a trusted gateway names the tenant in (see trust_tenant_header).",
    )


class AppArgs(StrictModel):
    """The `args` of the raycache application in a Serve config file."""

    namespace: str = Field(
        default="raycache",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-]*$",
        description="Prefix of every cache key and Redis key; separates deployments.",
    )
    models: tuple[ModelSpec, ...] = Field(
        default=(ModelSpec(id="tiny-gpt"),),
        min_length=1,
        description="Models served by every replica.",
    )
    result_cache: ResultCacheSettings = Field(default_factory=ResultCacheSettings)
    ingress_cache: IngressCacheSettings = Field(default_factory=IngressCacheSettings)
    prefix_cache: PrefixCacheSettings = Field(default_factory=PrefixCacheSettings)
    peer: PeerSettings = Field(default_factory=PeerSettings)
    shared_writes: SharedWriteSettings = Field(default_factory=SharedWriteSettings)
    model_pool: ModelPoolSettings = Field(default_factory=ModelPoolSettings)
    normalize_text: bool = Field(
        default=False,
        description="NFC-normalize text prompts and collapse their whitespace before anything "
        "else, so that prompts differing only there share cache entries (trades exactness for "
        "hit ratio: the answer is the normalized prompt's).",
    )
    limits: LimitSettings = Field(default_factory=LimitSettings)
    redis_url: str | None = Field(
        default=None,
        description=f"Shared Redis tier (`redis://`, `rediss://`, or `redis+cluster://` / "
        f"`rediss+cluster://` for Redis Cluster; user and password in the URL); null disables "
        f"it. {REDIS_URL_ENV} overrides it.",
    )
    admin_token: str | None = Field(
        default=None,
        description=f"Bearer token admin routes require; {ADMIN_TOKEN_ENV} overrides it.",
    )
    hmac_secret: str | None = Field(
        default=None,
        min_length=16,
        description=f"Cluster secret (at least 16 characters, not a template's placeholder): "
        f"signs every value in Redis and on the peer wire and every version record, "
        f"authenticates peer calls, and keys cache keys. Null: one is generated for the Ray "
        f"cluster and shared through Ray; set it when several clusters share one Redis. "
        f"{HMAC_SECRET_ENV} overrides it.",
    )
    auth: AuthSettings = Field(default_factory=AuthSettings)
    checkpoint_dir: str | None = Field(
        default=None,
        description="Directory that published checkpoints must lie in (resolved, no `..` "
        "escape; checked on each replica). Null: published versions may give a seed only.",
    )
    torch_threads: int = Field(
        default=1, ge=1, le=256, description="Intra-op threads of each model replica (threads)."
    )
    generation_threads: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Requests one replica generates at once; more wait for a thread (threads).",
    )
    stats_interval_s: float = Field(
        default=0.2, gt=0, le=60, description="How often replicas report cache stats (seconds)."
    )
    version_wait_s: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="How long a request waits for its replica to switch to a newly published "
        "version before failing with 503 (seconds); answers never come from older weights.",
    )

    @model_validator(mode="after")
    def _unique_model_ids(self) -> AppArgs:
        ids = [m.id for m in self.models]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"models: duplicate id(s) {duplicates}")
        unknown = sorted({p.model for p in self.prefix_cache.pinned} - set(ids))
        if unknown:
            raise ValueError(f"prefix_cache.pinned: unknown model(s) {unknown}")
        encoder_ids = {m.id for m in self.models if m.is_encoder}
        encoders = sorted({p.model for p in self.prefix_cache.pinned} & encoder_ids)
        if encoders:
            raise ValueError(f"prefix_cache.pinned: {encoders} embed, they have no prefix cache")
        pinned = [m.id for m in self.models if m.pinned]
        room = self.model_pool.max_loaded_models
        if room is not None and len(pinned) > room:
            raise ValueError(
                f"model_pool.max_loaded_models: {room} cannot hold the {len(pinned)} pinned "
                f"models {pinned}"
            )
        return self

    def model(self, model_id: str) -> ModelSpec | None:
        """The spec of `model_id`, or None when no such model is served."""
        return next((m for m in self.models if m.id == model_id), None)

    @field_validator("admin_token")
    @classmethod
    def _usable_admin_token(cls, token: str | None) -> str | None:
        if token is not None and (len(token) < MIN_SECRET_CHARS or is_placeholder(token)):
            raise ValueError(
                f"the admin token needs at least {MIN_SECRET_CHARS} characters and must not be "
                "a placeholder (for example `openssl rand -hex 32`)"
            )
        if token is not None and not BEARER_TOKEN_CHARS.fullmatch(token):
            raise ValueError("the admin token must be printable ASCII without spaces")
        return token

    @field_validator("hmac_secret")
    @classmethod
    def _usable_secret(cls, secret: str | None) -> str | None:
        if secret is not None:
            try:
                ClusterSecret.from_text(secret)
            except SecretError as exc:
                raise ValueError(str(exc)) from None
        return secret

    def configured_secret(self) -> ClusterSecret | None:
        """The operator's cluster secret, or None when one is to be generated."""
        return ClusterSecret.from_text(self.hmac_secret) if self.hmac_secret else None

    def with_environment(self, environ: dict[str, str] | None = None) -> AppArgs:
        """These args with the operator's environment overrides applied.

        Called on the node that runs a deployment, so the pod's environment wins over the file.
        """
        environ = os.environ if environ is None else environ
        updates: dict[str, str | None] = {}
        if REDIS_URL_ENV in environ:
            updates["redis_url"] = environ[REDIS_URL_ENV] or None
        if ADMIN_TOKEN_ENV in environ:
            updates["admin_token"] = environ[ADMIN_TOKEN_ENV] or None
        if HMAC_SECRET_ENV in environ:
            updates["hmac_secret"] = environ[HMAC_SECRET_ENV] or None
        # Validated like the file's values: a placeholder secret in the environment fails too.
        return parse_args({**self.model_dump(), **updates})


class ModelUpdate(StrictModel):
    """A version of one model to roll out: in `user_config`, or the body of
    `POST /v1/models/{model}/version`."""

    version: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]*$",
        description="The new version's label; answers are cached under it.",
    )
    seed: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SEED,
        description="Build the weights from this seed (built-in model).",
    )
    checkpoint: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="Load the weights from this safetensors checkpoint (a path every replica "
        "can read). Without seed and checkpoint the configured source is reloaded.",
    )
    force: bool = Field(
        default=False,
        description="Allow a label published before (going back); its old answers are invalidated.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelUpdate:
        if self.seed is not None and self.checkpoint is not None:
            raise ValueError("give seed or checkpoint, not both")
        return self


class ReplicaUserConfig(StrictModel):
    """The `user_config` of the `ModelReplica` deployment: `serve deploy` with a new version
    here rolls it out to the running replicas (through the version-broadcast actor)."""

    models: dict[str, ModelUpdate] = Field(
        default_factory=dict, description="Model id -> the version it must serve."
    )


class ConfigError(ValueError):
    """The application's args are invalid; the message names every bad field."""


def parse_args(raw: dict[str, object] | None) -> AppArgs:
    """Validate raw application args, raising `ConfigError` that names each bad field."""
    try:
        return AppArgs.model_validate(raw or {})
    except ValidationError as exc:
        raise ConfigError("invalid raycache args: " + _problems(exc)) from None


def parse_user_config(raw: dict[str, object] | None, args: AppArgs) -> ReplicaUserConfig:
    """Validate a `ModelReplica` `user_config` against `args`; `ConfigError` names bad fields."""
    try:
        config = ReplicaUserConfig.model_validate(raw or {})
    except ValidationError as exc:
        raise ConfigError("invalid ModelReplica user_config: " + _problems(exc)) from None
    unknown = sorted(set(config.models) - {m.id for m in args.models})
    if unknown:
        raise ConfigError(f"invalid ModelReplica user_config: models: unknown model(s) {unknown}")
    return config


_SECRET_FIELDS = frozenset({"admin_token", "hmac_secret"})


def _problems(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "args"
        if error["type"] == "extra_forbidden":
            problems.append(f"{where}: unknown key")
        elif error["loc"] and error["loc"][-1] in _SECRET_FIELDS:
            problems.append(f"{where}: {error['msg']}")  # never quote a secret back
        else:
            problems.append(f"{where}: {error['msg']} (got {error.get('input')!r})")
    return "; ".join(problems)


def prompt_text(text: str, args: AppArgs) -> str:
    """A text prompt as the application tokenizes it: normalized when `normalize_text` is on."""
    return normalize_text(text) if args.normalize_text else text
