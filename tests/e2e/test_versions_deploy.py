"""Versions on the application users run: `configs/cluster.yaml`, its admin routes over HTTP,
and a `serve deploy` of the same file with a new `user_config` version.

`serve deploy` hands the config to the dashboard, which hands it to the Serve controller's
`apply_config`; the test cluster runs without a dashboard, so the test hands the same config
to the controller's `deploy_apps` itself. Runs last among the end-to-end tests (file order):
it leaves the application on a new version.
"""

from __future__ import annotations

import copy

import pytest
import ray
from ray import serve
from ray.serve.schema import ServeDeploySchema

from cluster.sharing.directory_actor import directory_actor
from serve_app.config import ModelSpec
from serve_app.config_file import validate_config
from serve_app.models import ByteTokenizer, SamplingParams, generate
from serve_app.models.loading import load_model
from tests.support.processes import wait_until

pytestmark = pytest.mark.e2e

MODEL = "tiny-gpt"


@pytest.mark.parametrize(
    ("route", "body", "status", "param"),
    [
        ("/v1/models/tiny-gpt/version", {}, 400, "version"),
        ("/v1/models/tiny-gpt/version", {"version": "2", "sed": 1}, 400, "sed"),
        ("/v1/models/tiny-gpt/version", {"version": "2", "checkpoint": "/nope"}, 400, "checkpoint"),
        ("/v1/models/tiny-gpt/version", [], 400, "body"),
        ("/v1/models/no-such-model/version", {"version": "2"}, 404, "model"),
        ("/v1/models/tiny-gpt/version", {"version": "1", "seed": 99}, 409, "version"),
        ("/v1/cache/invalidate", {}, 400, "body"),
        ("/v1/cache/invalidate", {"key": "not hex"}, 400, "key"),
        ("/v1/cache/invalidate", {"model": "no-such-model"}, 404, "model"),
    ],
)
def test_admin_routes_reject_bad_input_naming_the_field(running_app, route, body, status, param):
    with running_app.http() as http:
        response = http.post(route, json=body, headers=running_app.admin_headers())
        assert response.status_code == status, response.text
        assert response.json()["error"]["param"] == param
        models = http.get("/v1/models").json()["data"]
    versions = {m["id"]: m["version"] for m in models}
    assert versions[MODEL] == "1"  # nothing changed


def test_invalidate_over_http_answers_who_acknowledged(running_app):
    prompt = {"model": MODEL, "prompt": "invalidate me", "max_tokens": 4, "temperature": 0}
    with running_app.http() as http:
        key = http.post("/v1/completions", json=prompt).json()["cache"]["key"]
        assert http.post("/v1/completions", json=prompt).json()["cache"]["tier"] == "ingress"
        response = http.post(
            "/v1/cache/invalidate", json={"key": key}, headers=running_app.admin_headers()
        )
        assert response.status_code == 200, response.text
        assert len(response.json()["acknowledged"]) == running_app.subscriber_count()
        assert not http.post("/v1/completions", json=prompt).json()["cache"]["hit"]


def test_serve_deploy_with_a_new_user_config_version_updates_replicas_in_place(running_app):
    config = copy.deepcopy(running_app.config)
    deployment = next(
        d for d in config["applications"][0]["deployments"] if d["name"] == "ModelReplica"
    )
    deployment["user_config"]["models"][MODEL] = {"version": "deployed-2", "seed": 7}
    assert validate_config(config) == []
    namespace = running_app.app_args()["namespace"]
    replicas_before = sorted(
        m.replica_id for m in ray.get(directory_actor(namespace).members.remote())
    )
    prompt = {"model": MODEL, "prompt": "which weights?", "max_tokens": 8, "temperature": 0}
    with running_app.http() as http:
        before = [http.post("/v1/completions", json=prompt).json() for _ in range(2)]
    # Kept by the ingress too: the new version must drop it there as well.
    assert [answer["cache"]["tier"] for answer in before] == [None, "ingress"]
    assert before[1]["model_version"] == "1"

    serve.context._get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))

    with running_app.http() as http:

        def rolled_out() -> bool:
            models = http.get("/v1/models").json()["data"]
            return models[0]["version"] == "deployed-2"

        wait_until(rolled_out, 120, "the new user_config version to be published", 0.5)
        answers = [http.post("/v1/completions", json=prompt).json() for _ in range(4)]
    replicas_after = sorted(
        m.replica_id for m in ray.get(directory_actor(namespace).members.remote())
    )
    assert replicas_after == replicas_before  # reconfigured in place, not restarted
    model = load_model(ModelSpec(id=MODEL, seed=7), device="cpu")
    tokenizer = ByteTokenizer()
    expected = generate(
        model, tokenizer, tokenizer.encode("which weights?"), SamplingParams(8, 0.0)
    ).text
    for answer in answers:
        assert answer["model_version"] == "deployed-2"
        assert answer["choices"][0]["text"] == expected
    assert answers[0]["cache"]["tier"] != "ingress" and answers[-1]["cache"]["tier"] == "ingress"
