"""The application started from configs/cluster.yaml, called over HTTP and through handles."""

from __future__ import annotations

import pytest

from serve_app.config import parse_args
from serve_app.errors import InvalidRequest, ModelNotFound
from serve_app.models import ByteTokenizer, SamplingParams, generate
from serve_app.models.loading import load_model
from tests.support.processes import wait_until

pytestmark = pytest.mark.e2e

MODEL = "tiny-gpt"


def completion(prompt: str, **extra) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, **extra}


def answer_of(response: dict) -> tuple:
    """The parts of a response that must not depend on where the answer came from."""
    choice = response["choices"][0]
    return choice["text"], choice["finish_reason"], response["usage"], response["model_version"]


def test_http_completion_is_served_from_cache_the_second_time(running_app):
    with running_app.http() as http:
        first = http.post("/v1/completions", json=completion("The cache remembers"))
        second = http.post("/v1/completions", json=completion("The cache remembers"))
    assert first.status_code == second.status_code == 200, first.text
    first, second = first.json(), second.json()
    assert first["cache"] == {"hit": False, "tier": None, "key": second["cache"]["key"]}
    # Answered by the ingress itself: no hop to a replica.
    assert second["cache"] == {"hit": True, "tier": "ingress", "key": first["cache"]["key"]}
    assert len(first["cache"]["key"]) == 64  # hex of a 256-bit result key
    assert answer_of(first) == answer_of(second)
    assert first["object"] == "text_completion" and first["model"] == MODEL
    assert first["usage"]["prompt_tokens"] == len(b"The cache remembers")
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


def test_cached_answer_equals_a_local_recomputation(running_app):
    """The served tokens are exactly what the configured weights produce."""
    prompt = "Recompute me"
    with running_app.http() as http:
        served = [http.post("/v1/completions", json=completion(prompt)).json() for _ in range(2)]
    spec = parse_args(running_app.app_args()).model(MODEL)
    tokenizer = ByteTokenizer()
    expected = generate(
        load_model(spec, device="cpu"),
        tokenizer,
        tokenizer.encode(prompt),
        SamplingParams(max_tokens=12, temperature=0.0),
    )
    for response in served:
        assert response["choices"][0]["text"] == expected.text
        assert response["usage"]["completion_tokens"] == len(expected.tokens)


def test_handle_completion_is_served_from_cache_the_second_time(app_handle):
    body = completion("Handles share the cache")
    first = app_handle.complete.remote(body).result(timeout_s=60)
    second = app_handle.complete.remote(body).result(timeout_s=60)
    assert first["cache"]["hit"] is False
    assert {k: second["cache"][k] for k in ("hit", "tier")} == {"hit": True, "tier": "ingress"}
    assert answer_of(first) == answer_of(second)


def test_http_and_handles_share_one_cache(running_app, app_handle):
    body = completion("Asked over HTTP, then over a handle")
    with running_app.http() as http:
        over_http = http.post("/v1/completions", json=body).json()
    # A handle's caller is inside the cluster and names the tenant.
    over_handle = app_handle.complete.remote(body, tenant="alice").result(timeout_s=60)
    assert over_handle["cache"]["hit"] is True
    assert answer_of(over_http) == answer_of(over_handle)


def test_tenants_do_not_share_answers(running_app):
    body = completion("Tenant private")
    with running_app.http("alice") as alice, running_app.http("bob") as bob:
        alice.post("/v1/completions", json=body)
        as_bob = bob.post("/v1/completions", json=body).json()
        as_alice = alice.post("/v1/completions", json=body).json()
    assert as_bob["cache"]["hit"] is False
    assert as_alice["cache"]["hit"] is True
    assert answer_of(as_alice) == answer_of(as_bob)  # same weights, same tokens


def test_only_deterministic_requests_are_cached(running_app):
    unseeded = completion("Roll the dice", temperature=0.9)
    seeded = completion("Roll the dice", temperature=0.9, seed=1234)
    with running_app.http() as http:
        unseeded_hits = [
            http.post("/v1/completions", json=unseeded).json()["cache"]["hit"] for _ in range(2)
        ]
        seeded_answers = [http.post("/v1/completions", json=seeded).json() for _ in range(2)]
    assert unseeded_hits == [False, False]
    assert [a["cache"]["hit"] for a in seeded_answers] == [False, True]
    assert answer_of(seeded_answers[0]) == answer_of(seeded_answers[1])


def test_token_id_prompt_matches_text_prompt(running_app):
    text = "same prompt"
    with running_app.http() as http:
        by_text = http.post("/v1/completions", json=completion(text)).json()
        by_ids = http.post("/v1/completions", json=completion(list(text.encode()))).json()
    assert by_ids["cache"]["hit"] is True
    assert answer_of(by_text) == answer_of(by_ids)


def test_models_lists_every_model_with_its_version(running_app):
    with running_app.http() as http:
        listing = http.get("/v1/models").json()
    expected = {(m["id"], m.get("version", "1")) for m in running_app.app_args()["models"]}
    assert {(m["id"], m["version"]) for m in listing["data"]} == expected
    assert listing["object"] == "list"


def test_stats_count_hits_and_misses_per_replica(running_app):
    with running_app.http() as http:
        before_all = http.get("/v1/cache/stats").json()
        before, before_ingress = before_all["total"], before_all["ingress"]
        for _ in range(3):
            http.post("/v1/completions", json=completion("Count me"))

        def counted() -> bool:
            stats = http.get("/v1/cache/stats").json()
            # The first request asked a replica; the ingress answered the other two itself.
            hits = stats["ingress"]["hits"] - before_ingress["hits"]
            return hits >= 2 and stats["total"]["misses"] - before["misses"] >= 1

        wait_until(counted, 10, "stats to count the new requests")
        stats = http.get("/v1/cache/stats").json()
    assert len(stats["replicas"]) == running_app.replica_count()
    total = stats["total"]
    assert total["entries"] >= 1 and total["bytes"] > 0
    assert 0 <= total["hit_ratio"] < 1
    assert stats["ingress"]["entries"] >= 1 and 0 < stats["ingress"]["hit_ratio"] < 1
    assert set(total["tiers"]) == {"local", "peer", "redis"}
    assert total["tiers"]["peer"]["hits"] == total["tiers"]["redis"]["hits"] == 0
    assert set(total["prefix"]) == {"queried_tokens", "cached_tokens"}
    for replica in stats["replicas"].values():
        assert replica["cluster"]["ring_size"] == running_app.replica_count()
        assert replica["cluster"]["redis_breaker"] == "closed"
        assert isinstance(replica["cluster"]["pid"], int) and replica["cluster"]["pid"] > 0


def test_healthz_reports_redis(running_app):
    with running_app.http() as http:
        health = http.get("/healthz")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert health.json()["redis"] == "up"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": "hi"}, 400, "model"),
        ({"model": MODEL}, 400, "prompt"),
        ({"model": MODEL, "prompt": {"text": "hi"}}, 400, "prompt"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 10**6}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "hi", "temperature": 7}, 400, "temperature"),
        ({"model": MODEL, "prompt": "hi", "best_of": 3}, 400, "best_of"),
        ({"model": MODEL, "prompt": ""}, 400, "prompt"),
        ({"model": MODEL, "prompt": [1, 2, 999]}, 400, "prompt"),
        ({"model": MODEL, "prompt": "x" * 5000}, 400, "prompt"),
        ({"model": "no-such-model", "prompt": "hi"}, 404, "model"),
    ],
)
def test_bad_input_gets_a_4xx_naming_the_field(running_app, body, status, param):
    with running_app.http() as http:
        response = http.post("/v1/completions", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize(
    "raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b'{"model": "tiny-gpt", "prompt": NaN}']
)
def test_malformed_bodies_get_a_400(running_app, raw):
    with running_app.http() as http:
        response = http.post(
            "/v1/completions", content=raw, headers={"content-type": "application/json"}
        )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] in ("body", "prompt")


def test_bad_input_over_a_handle_raises_the_named_error(app_handle):
    with pytest.raises(InvalidRequest) as invalid:
        app_handle.complete.remote({"model": MODEL, "prompt": "hi", "top_p": 2}).result(
            timeout_s=60
        )
    assert invalid.value.param == "top_p"
    with pytest.raises(ModelNotFound):
        app_handle.complete.remote({"model": "nope", "prompt": "hi"}).result(timeout_s=60)
