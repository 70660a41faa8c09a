"""The cache-affinity router's choice, on the replicas Serve would hand it (no cluster)."""

import asyncio
from dataclasses import dataclass, field

from cluster.sharing.ring import Ring
from serve_app.api.completions import CompletionJob
from serve_app.models import SamplingParams
from serve_app.router import CacheAffinityRouter


@dataclass(frozen=True)
class FakeId:
    unique_id: str


@dataclass(frozen=True)
class FakeReplica:
    replica_id: FakeId


@dataclass
class FakeRequest:
    args: list = field(default_factory=list)


class QueueLengths(dict):
    def get(self, replica_id):
        return super().get(replica_id.unique_id)


def router(queue_lengths: dict[str, int]) -> CacheAffinityRouter:
    # The Serve constructor needs a running controller; the choice itself needs only these.
    chosen = CacheAffinityRouter.__new__(CacheAffinityRouter)
    chosen._replica_queue_len_cache = QueueLengths(queue_lengths)
    chosen.initialize_state(max_owner_queue=4)
    return chosen


REPLICAS = [FakeReplica(FakeId(name)) for name in ("r1", "r2", "r3")]


def job(key: str | None, replica: str | None = None) -> FakeRequest:
    return FakeRequest(
        [CompletionJob("m", "t", (1, 2), SamplingParams(max_tokens=1), key, replica)]
    )


def choose(chosen: CacheAffinityRouter, request: FakeRequest) -> list[list[str]]:
    ranks = asyncio.run(chosen.choose_replicas(REPLICAS, request))
    return [[r.replica_id.unique_id for r in rank] for rank in ranks]


def test_a_keyed_request_goes_to_its_ring_owner_first():
    owner = Ring(dict.fromkeys(["r1", "r2", "r3"], 1.0)).owner("prompt-key")
    ranks = choose(router({}), job("prompt-key"))
    assert ranks[0] == [owner]
    assert sorted(ranks[1]) == sorted({"r1", "r2", "r3"} - {owner})


def test_a_busy_owner_is_passed_over_but_stays_the_last_resort():
    owner = Ring(dict.fromkeys(["r1", "r2", "r3"], 1.0)).owner("prompt-key")
    ranks = choose(router({owner: 9}), job("prompt-key"))
    assert owner not in ranks[0] and len(ranks[0]) == 2
    assert ranks[-1] == [owner]


def test_a_named_replica_wins_and_unkeyed_requests_get_two_choices():
    assert choose(router({}), job("prompt-key", replica="r3")) == [["r3"]]
    (pair,) = choose(router({}), job(None))
    assert len(pair) == 2 and set(pair) <= {"r1", "r2", "r3"}


class DirectoryRing:
    """The directory's ring as `RingWatcher.ring()` gives it."""

    def __init__(self, members: list[str]) -> None:
        self._ring = Ring(dict.fromkeys(members, 1.0))

    def ring(self) -> Ring:
        return self._ring


def test_the_directory_ring_decides_and_an_excluded_replica_comes_last():
    chosen = router({})
    chosen._directory_ring = DirectoryRing(["r1", "r2"])  # r3 excluded by the version actor
    keys = [f"prompt-{i}" for i in range(50)]
    for key in keys:
        ranks = choose(chosen, job(key))
        assert ranks[0] == [Ring(dict.fromkeys(["r1", "r2"], 1.0)).owner(key)]
        assert ranks[1][-1] == "r3"


def test_a_directory_ring_of_no_running_replica_gives_way_to_the_running_ones():
    chosen = router({})
    chosen._directory_ring = DirectoryRing(["gone-1", "gone-2"])
    owner = Ring(dict.fromkeys(["r1", "r2", "r3"], 1.0)).owner("prompt-key")
    assert choose(chosen, job("prompt-key"))[0] == [owner]
