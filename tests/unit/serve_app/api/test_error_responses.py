"""What the HTTP API answers for errors: the OpenAI error body, and `Retry-After` on a 503,
also for a failure inside Ray (a replica that died under the request), never a raw 500."""

from __future__ import annotations

import json

import pytest
import ray
from starlette.requests import Request

from serve_app.api.ingress import _ray_error, _raycache_error
from serve_app.errors import InvalidRequest, ModelLoading, ModelUpdating, ReplicaUnavailable

REQUEST = Request({"type": "http", "method": "POST", "path": "/v1/completions", "headers": []})


@pytest.mark.asyncio
@pytest.mark.parametrize("error", [ModelUpdating, ModelLoading, ReplicaUnavailable])
async def test_a_503_says_when_to_try_again(error):
    response = await _raycache_error(REQUEST, error("busy", param="model"))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert json.loads(response.body)["error"]["param"] == "model"


@pytest.mark.asyncio
async def test_a_client_error_has_no_retry_after():
    response = await _raycache_error(REQUEST, InvalidRequest("bad", param="max_tokens"))
    assert response.status_code == 400 and "retry-after" not in response.headers


@pytest.mark.asyncio
async def test_a_failure_inside_ray_is_a_json_503_with_retry_after():
    response = await _ray_error(REQUEST, ray.exceptions.ActorDiedError())
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert json.loads(response.body)["error"]["code"] == "replica_unavailable"
