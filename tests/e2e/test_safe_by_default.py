"""Safe by default, on the application users run: tenants from API keys, closed admin routes,
Redis as untrusted storage, and requests that survive their neighbours' cancellation.

The attacker here can reach the HTTP port and Redis but holds neither an API key of the victim
tenant, nor the admin token, nor the cluster secret. The test itself is a Ray driver of the
cluster, so it can read the generated secret the way a replica does, to compute the Redis key
an answer will be looked up under (which an attacker cannot).
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import Callable

import grpc
import httpx
import pytest
import ray

from cluster.codec import encode
from cluster.secret import ClusterSecret
from cluster.sharing.directory_actor import directory_actor
from cluster.sharing.peer_blocks import Status, encode_request
from cluster.sharing.proto import peer_pb2, peer_pb2_grpc
from tests.support.answer_keys import answer_redis_key, serving_version
from tests.support.processes import wait_until

pytestmark = pytest.mark.e2e

MODEL = "tiny-gpt"
VERSION = "1"
KEY_ID = slice(20, 28)  # where an envelope names the secret that signed it (cluster/codec.py)


def completion(prompt: str, **overrides: object) -> dict[str, object]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0, **overrides}


def redis_key_of(running_app, tenant: str, body: dict[str, object]) -> str:
    """The Redis key the replicas look `body` up under for `tenant`, at `VERSION`."""
    namespace = running_app.app_args()["namespace"]
    assert serving_version(namespace, MODEL).version == VERSION
    return answer_redis_key(running_app, tenant, body)


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-key-0123456789", "Basic alice-key-0123456789abcdef", b"Bearer \xff\xfe"],
)
def test_a_completion_without_a_valid_api_key_is_refused(running_app, authorization):
    headers = {} if authorization is None else {"authorization": authorization}
    response = httpx.post(
        f"{running_app.url}/v1/completions", json=completion("who am I"), headers=headers
    )
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("authentication_error", "authorization")


def test_a_tenant_learns_nothing_of_another_tenants_prompts(running_app):
    secret_prompt = "Alice's merger plan, long enough to fill several prefix blocks of the cache."
    with running_app.http("alice") as alice, running_app.http("bob") as bob:
        assert alice.post("/v1/completions", json=completion(secret_prompt)).status_code == 200
        assert alice.post("/v1/completions", json=completion(secret_prompt)).json()["cache"]["hit"]
        # Claiming alice through the tenant header does nothing: no gateway is trusted. A longer
        # prompt, so that its blocks would show as cached tokens had alice's been shared.
        claimed = bob.post(
            "/v1/completions",
            json=completion(secret_prompt + " And more."),
            headers={"x-raycache-tenant": "alice"},
        ).json()
        # Bob's own blocks of the prompt are cached now, but alice's answer is not his.
        asked = bob.post("/v1/completions", json=completion(secret_prompt)).json()
    assert claimed["cache"]["hit"] is False
    assert claimed["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert asked["cache"]["hit"] is False


def test_admin_routes_need_the_admin_token(running_app):
    body = {"key": "0" * 32}
    route = f"{running_app.url}/v1/cache/invalidate"
    for headers in (
        {},
        {"authorization": "Bearer wrong-token-0123456789"},
        running_app.auth_headers("alice"),  # a client's API key is no admin token
        {"authorization": b"Bearer \xe9t\xe9"},
    ):
        response = httpx.post(route, json=body, headers=headers, timeout=60)
        assert response.status_code == 401, response.text
    response = httpx.post(route, json=body, headers=running_app.admin_headers(), timeout=60)
    assert response.status_code == 200, response.text


def test_healthz_is_open_and_says_how_tenants_are_decided(running_app):
    health = httpx.get(f"{running_app.url}/healthz", timeout=30)
    assert health.status_code == 200
    assert (health.json()["auth"], health.json()["admin"]) == ("api_keys", "open")
    assert "alice" not in health.text and "bob" not in health.text


def test_a_value_moved_or_forged_in_redis_is_never_served(running_app, redis_server):
    redis = redis_server.client()
    original = completion("The answer that an attacker moves around")
    with running_app.http("alice") as alice:
        assert alice.post("/v1/completions", json=original).status_code == 200
        source = redis_key_of(running_app, "alice", original)
        wait_until(lambda: redis.exists(source), 30, "the answer to reach Redis", 0.1)
        envelope = redis.get(source)
        # A signed envelope copied under other requests' keys: another prompt, another tenant.
        victims = {
            "another prompt": ("alice", completion("A prompt nobody asked before, moved")),
            "another tenant": ("bob", completion("The answer that an attacker moves around")),
            "a forged value": ("alice", completion("A prompt nobody asked before, forged")),
        }
        # Well-formed and signed, under a secret of the attacker's own, and claiming the
        # cluster's key id (which any envelope in Redis shows): what anyone who can write to
        # Redis can make.
        forged = encode(
            "completion",
            MODEL,
            VERSION,
            created_at=time.time(),
            blob=b"\x80",
            meta={"key": "0" * 32, "tenant": "alice"},
            secret=ClusterSecret.generate(),
        )
        forged = forged[: KEY_ID.start] + envelope[KEY_ID] + forged[KEY_ID.stop :]
        for name, (tenant, body) in victims.items():
            redis.set(
                redis_key_of(running_app, tenant, body), forged if "forged" in name else envelope
            )
        with running_app.http("bob") as bob:
            for name, (tenant, body) in victims.items():
                client = bob if tenant == "bob" else alice
                answer = client.post("/v1/completions", json=body).json()
                assert answer["cache"]["hit"] is False, name

    def rejected() -> int:
        stats = httpx.get(f"{running_app.url}/v1/cache/stats", timeout=30).json()
        return sum(r["cluster"]["corrupt_values"] for r in stats["replicas"].values())

    # Replicas report their statistics every few seconds.
    wait_until(lambda: rejected() >= len(victims), 30, "the rejections to be reported", 0.5)
    # Deleted when found, then replaced by the replica's own answer.
    for name, (tenant, body) in victims.items():
        assert redis.get(redis_key_of(running_app, tenant, body)) not in (envelope, forged), name


@pytest.mark.asyncio
async def test_cancelling_the_first_of_identical_requests_leaves_the_others_their_answer(
    running_app,
):
    body = completion("Three clients ask the same long question at once", max_tokens=300)
    headers = running_app.auth_headers("alice")

    async def ask() -> httpx.Response:
        async with httpx.AsyncClient(base_url=running_app.url, timeout=120) as client:
            return await client.post("/v1/completions", json=body, headers=headers)

    first = asyncio.create_task(ask())
    await asyncio.sleep(0.5)  # the first is computing; the others will wait on it
    others = [asyncio.create_task(ask()) for _ in range(2)]
    await asyncio.sleep(0.5)
    first.cancel()  # its client disconnects, and Serve cancels its request
    answers = await asyncio.gather(*others)
    for response in answers:
        assert response.status_code == 200, response.text
    assert len({r.json()["choices"][0]["text"] for r in answers}) == 1


@pytest.mark.asyncio
async def test_an_answer_computed_across_an_invalidation_is_not_served_from_cache(running_app):
    body = completion("Invalidated while it is being computed", max_tokens=300)
    redis_key_hex = redis_key_of(running_app, "alice", body).rsplit(":", 1)[1]
    async with httpx.AsyncClient(base_url=running_app.url, timeout=120) as client:
        computing = asyncio.create_task(
            client.post("/v1/completions", json=body, headers=running_app.auth_headers("alice"))
        )
        await asyncio.sleep(0.5)
        invalidated = await client.post(
            "/v1/cache/invalidate",
            json={"key": redis_key_hex},
            headers=running_app.admin_headers(),
        )
        assert invalidated.status_code == 200, invalidated.text
        first = await computing
        assert first.status_code == 200 and first.json()["cache"]["hit"] is False
        again = await client.post(
            "/v1/completions", json=body, headers=running_app.auth_headers("alice")
        )
    assert again.json()["cache"]["hit"] is False


def unauthenticated_calls(stub: peer_pb2_grpc.PeerStub) -> list[Callable[[], object]]:
    """Every peer RPC, called as an attacker would: well-formed, with no credential."""
    forged = peer_pb2.PutResultsRequest(items=[peer_pb2.ResultItem(key="0" * 32, value=b"x")])
    return [
        lambda: stub.GetResults(peer_pb2.GetResultsRequest(keys=["0" * 32]), timeout=10),
        lambda: stub.PutResults(forged, timeout=10),
        lambda: stub.Ping(peer_pb2.PingRequest(), timeout=10),
    ]


def test_the_running_replicas_peer_ports_refuse_a_caller_without_the_secret(running_app):
    members = ray.get(directory_actor(running_app.app_args()["namespace"]).members.remote())
    assert len(members) == running_app.replica_count()
    for member in members:
        with grpc.insecure_channel(member.peer_address) as channel:
            for call in unauthenticated_calls(peer_pb2_grpc.PeerStub(channel)):
                with pytest.raises(grpc.RpcError) as refused:
                    call()
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # The block stream: a well-formed request, its credential made without the secret.
        request = encode_request(
            ClusterSecret.generate().peer,
            member.blocks_address,
            [b"\0" * 32],
            time.time(),
            secrets.token_bytes(16),
        )
        host, port = member.blocks_address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as connection:
            connection.sendall(request)
            answer = b"".join(iter(lambda: connection.recv(65536), b""))
        assert answer[0] == Status.UNAUTHENTICATED
