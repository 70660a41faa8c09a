"""Admin operations: the bodies of the admin routes, and publishing (the token check is
`serve_app.api.auth.check_admin_token`).

`POST /v1/models/{model}/version` takes a `ModelUpdate` (`version`, optional `seed` or
`checkpoint`, `force`, plus `timeout_s`); `POST /v1/cache/invalidate` an `InvalidationRequest`.
Each parse raises `InvalidRequest` naming the bad field, so a bad body is a 400, never a 500.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

from pydantic import Field, ValidationError, model_validator
from ray.actor import ActorHandle

from cluster.versions.records import PublishOutcome
from serve_app.config import ModelUpdate, StrictModel
from serve_app.errors import InvalidRequest
from serve_app.replica.serving import CheckpointRefused, allowed_checkpoint

_LABEL = r"^[A-Za-z0-9][A-Za-z0-9._\-]*$"
_Body = TypeVar("_Body", bound=StrictModel)


class VersionUpdateRequest(ModelUpdate):
    """The body of `POST /v1/models/{model}/version`."""

    timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="How long to wait for every replica to acknowledge (seconds).",
    )


class InvalidationRequest(StrictModel):
    """The body of `POST /v1/cache/invalidate`: entries matching every given field go."""

    model: str | None = Field(default=None, min_length=1, max_length=128, pattern=_LABEL)
    version: str | None = Field(default=None, min_length=1, max_length=64, pattern=_LABEL)
    tenant: str | None = Field(default=None, min_length=1, max_length=256)
    key: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{16,128}$",
        description="A result key, as a completion reports it in `cache.key`.",
    )
    timeout_s: float = Field(default=30.0, gt=0, le=600)

    @model_validator(mode="after")
    def _something_selected(self) -> InvalidationRequest:
        if self.model is None and self.version is None and self.tenant is None and not self.key:
            raise ValueError("give at least one of model, version, tenant, key")
        return self


async def publish_update(
    versions: ActorHandle[Any], model: str, update: ModelUpdate, source: str, timeout_s: float
) -> PublishOutcome:
    """Publish `update` of `model` through the version actor `versions`; waits up to
    `timeout_s` for the replicas. Raises `VersionRegression` when it would go back."""
    outcome: PublishOutcome = await versions.publish.remote(
        model,
        update.version,
        source=source,
        seed=update.seed,
        checkpoint=update.checkpoint,
        force=update.force,
        timeout_s=timeout_s,
    )
    return outcome


def parse_version_update(
    body: Any, checkpoint_dir: str | None = None, kind: str = "tiny-gpt"
) -> VersionUpdateRequest:
    """Validate the body of a version publish of a model of `kind`; raises `InvalidRequest`.
    A checkpoint must lie in `checkpoint_dir` (each replica checks that again before it loads
    anything) and be what that kind loads: a file for TinyGPT, a directory holding
    `config.json` for a Hugging Face model."""
    update = _parse(VersionUpdateRequest, body)
    if update.checkpoint is not None:
        try:
            path = allowed_checkpoint(update.checkpoint, checkpoint_dir)
        except CheckpointRefused as exc:
            raise InvalidRequest(str(exc), param="checkpoint") from None
        # Checked here so that a typo fails the request instead of every replica's reload.
        if kind in ("hf", "hf-encoder") and not os.path.isfile(os.path.join(path, "config.json")):
            raise InvalidRequest(
                "no checkpoint directory (with a config.json) there on the ingress node",
                param="checkpoint",
            )
        if kind == "tiny-gpt" and not os.path.isfile(path):
            raise InvalidRequest("no such file on the ingress node", param="checkpoint")
    return update


def parse_invalidation(body: Any) -> InvalidationRequest:
    """Validate the body of an invalidation; raises `InvalidRequest`."""
    return _parse(InvalidationRequest, body)


def _parse(model: type[_Body], body: Any) -> _Body:
    if not isinstance(body, dict):
        raise InvalidRequest("must be a JSON object", param="body")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(part) for part in error["loc"]) or "body"
        message = "unknown field" if error["type"] == "extra_forbidden" else error["msg"]
        raise InvalidRequest(message, param=param) from None
