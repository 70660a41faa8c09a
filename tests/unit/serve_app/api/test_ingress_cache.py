"""The ingress cache keeps every rule of the replicas' version fencing: only answers of the
version it follows, nothing served or stored while a version is changing or the actor is out
of touch, a version's switch and an invalidation drop what they select, and an answer created
before a rule is never stored after it."""

import dataclasses
import time

from cluster.secret import ClusterSecret
from cluster.versions.invalidation import InvalidationRule
from cluster.versions.records import ModelVersion
from serve_app.api.completions import CompletionJob, CompletionOutcome
from serve_app.api.ingress_cache import IngressCache, Lookup
from serve_app.config import IngressCacheSettings, ResultCacheSettings
from serve_app.models import SamplingParams
from serve_app.replica.answers import completion_key

SECRET = ClusterSecret(b"0123456789abcdef-cluster-secret")
V1 = ModelVersion("tiny", "1", generation=1, seed=0)
V2 = ModelVersion("tiny", "2", generation=2, seed=1)
OTHER_MODEL = ModelVersion("other", "1", generation=1, seed=0)
GREEDY = SamplingParams(max_tokens=4)


class Versions:
    """What the follower would report (a fake of pure state for these unit tests)."""

    def __init__(self) -> None:
        self.lagging_models: set[str] = set()
        self.contact = True

    def lagging(self, model: str) -> bool:
        return model in self.lagging_models

    def in_contact(self) -> bool:
        return self.contact


def make_cache() -> tuple[IngressCache, Versions]:
    cache = IngressCache(
        IngressCacheSettings(),
        ResultCacheSettings(),
        "ns",
        SECRET,
        initial={"tiny": V1, "other": OTHER_MODEL},
    )
    versions = Versions()
    cache.connect(versions)
    return cache, versions


def job(prompt: tuple[int, ...] = (1, 2, 3), *, tenant: str = "alice", **params) -> CompletionJob:
    model = params.pop("model", "tiny")
    return CompletionJob(model, tenant, prompt, dataclasses.replace(GREEDY, **params))


def replica_answer(
    of: CompletionJob, weights: ModelVersion = V1, created_at: float | None = None
) -> CompletionOutcome:
    """What a replica serving `weights` answers to `of`, as its cache key records."""
    return CompletionOutcome(
        text=f"answer to {of.prompt_tokens}",
        finish_reason="length",
        prompt_tokens=len(of.prompt_tokens),
        completion_tokens=4,
        cached_tokens=0,
        model_version=weights.version,
        cache_tier=None,
        cache_key=completion_key("ns", SECRET, of, weights),
        pieces=(3, 4),
        created_at=time.time() if created_at is None else created_at,
    )


def kept(cache: IngressCache, of: CompletionJob) -> CompletionOutcome | None:
    lookup = cache.lookup(of)
    return cache.get(lookup) if lookup is not None else None


def store(cache: IngressCache, of: CompletionJob, **answer) -> tuple[Lookup, bool]:
    lookup = cache.lookup(of)
    assert lookup is not None
    return lookup, cache.put(lookup, replica_answer(of, **answer))


def test_a_kept_answer_is_the_replicas_served_from_tier_ingress():
    cache, _ = make_cache()
    asked = job()
    assert kept(cache, asked) is None
    _, stored = store(cache, asked)
    assert stored
    hit = kept(cache, asked)
    answer = replica_answer(asked)
    assert hit is not None and hit.cache_tier == "ingress" and hit.cached_tokens == 0
    assert (hit.text, hit.pieces, hit.cache_key) == (answer.text, answer.pieces, answer.cache_key)


def test_the_key_is_the_replicas_for_the_version_followed():
    cache, _ = make_cache()
    asked = job()
    lookup = cache.lookup(asked)
    assert lookup is not None and lookup.key == completion_key("ns", SECRET, asked, V1)


def test_sampled_requests_are_neither_served_nor_kept():
    cache, _ = make_cache()
    assert cache.lookup(job(temperature=0.8)) is None
    assert cache.lookup(job(temperature=0.8, seed=7)) is not None  # seeded: deterministic


def test_an_answer_of_other_weights_than_the_ones_followed_is_not_kept():
    cache, _ = make_cache()
    asked = job()
    _, stored = store(cache, asked, weights=V2)  # a replica already on version 2
    assert not stored and kept(cache, asked) is None


def test_an_answer_that_records_no_creation_time_is_not_kept():
    cache, _ = make_cache()
    asked = job()
    lookup = cache.lookup(asked)
    assert lookup is not None
    untimed = dataclasses.replace(replica_answer(asked), created_at=None)
    assert not cache.put(lookup, untimed)


def test_a_new_version_drops_its_models_answers_and_refuses_those_in_flight():
    cache, _ = make_cache()
    first, other = job((1,)), job((1,), model="other")
    store(cache, first)
    store(cache, other)
    in_flight = cache.lookup(job((2,)))
    assert in_flight is not None
    cache.apply_version(V2)
    assert kept(cache, first) is None  # its key is now version 2's, and the old entry is gone
    assert len(cache.cache) == 1 and kept(cache, other) is not None  # another model's stays
    assert not cache.put(in_flight, replica_answer(job((2,))))  # answered by version 1
    _, stored = store(cache, first, weights=V2)
    assert stored and kept(cache, first) is not None


def test_nothing_is_served_or_kept_while_a_newer_version_is_not_applied():
    cache, versions = make_cache()
    asked = job()
    lookup, _ = store(cache, asked)
    versions.lagging_models.add("tiny")
    assert cache.lookup(asked) is None
    assert cache.get(lookup) is None and not cache.put(lookup, replica_answer(asked))
    assert cache.lookup(job(model="other")) is not None  # only the changing model is held back


def test_nothing_is_served_or_kept_out_of_touch_with_the_version_actor():
    cache, versions = make_cache()
    asked = job()
    lookup, _ = store(cache, asked)
    versions.contact = False
    assert cache.lookup(asked) is None
    assert cache.get(lookup) is None and not cache.put(lookup, replica_answer(asked))
    versions.contact = True
    assert kept(cache, asked) is not None


def test_an_invalidation_drops_what_it_selects_and_refuses_older_answers_later():
    cache, _ = make_cache()
    alice, bob = job(tenant="alice"), job(tenant="bob")
    store(cache, alice)
    store(cache, bob)
    issued = time.time()
    cache.apply_rules([InvalidationRule(seq=1, issued_at=issued, tenant="alice")])
    assert kept(cache, alice) is None and kept(cache, bob) is not None
    # A replica that had not applied the rule yet answered from before it: not kept.
    _, stored = store(cache, alice, created_at=issued - 60)
    assert not stored
    _, stored = store(cache, alice, created_at=issued + 60)
    assert stored and kept(cache, alice) is not None


def test_an_invalidation_by_key_reaches_the_ingress_copy():
    cache, _ = make_cache()
    first, second = job((1,)), job((2,))
    lookup, _ = store(cache, first)
    store(cache, second)
    cache.apply_rules([InvalidationRule(seq=1, issued_at=time.time(), key=lookup.key)])
    assert kept(cache, first) is None and kept(cache, second) is not None


def test_tenants_never_share_an_answer():
    cache, _ = make_cache()
    store(cache, job(tenant="alice"))
    assert kept(cache, job(tenant="bob")) is None
