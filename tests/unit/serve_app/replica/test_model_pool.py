"""`ModelPool`: models loaded on demand under a count and a byte budget, the least recently
used idle one evicted, one load however many ask, pinned models kept, versions applied at the
next load, the heap returned once dropped weights are freed. Real TinyGPT weights (tiny ones),
built from seeds."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import threading
import time
import weakref
from collections.abc import Iterator

import pytest
import torch

from cluster.versions.records import ModelVersion
from serve_app.config import ModelSpec
from serve_app.errors import ModelLoading
from serve_app.models import CausalLM
from serve_app.models.loading import load_model, weight_bytes_estimate
from serve_app.replica.model_pool import ModelPool
from serve_app.replica.serving import config_version, weights_spec

SPECS = {
    name: ModelSpec(id=name, seed=seed, n_layers=1, d_model=32, n_heads=2, max_context=64)
    for seed, name in enumerate(("a", "b", "c"), start=1)
}
MODEL_BYTES = weight_bytes_estimate(SPECS["a"])


class Loader:
    """Loads real weights, counting loads per model; `gate` holds loads until set."""

    def __init__(self) -> None:
        self.loads: list[tuple[str, str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail: set[str] = set()

    def __call__(self, record: ModelVersion) -> CausalLM:
        self.gate.wait(10)
        if record.model in self.fail:
            raise OSError(f"cannot read the weights of {record.model}")
        self.loads.append((record.model, record.version))
        return load_model(weights_spec(SPECS[record.model], record))


def pool(loader: Loader, **kwargs: object) -> ModelPool:
    return ModelPool(
        {name: config_version(spec) for name, spec in SPECS.items()},
        loader,
        lambda model: weight_bytes_estimate(SPECS[model]),
        **kwargs,  # type: ignore[arg-type]
    )


def test_start_loads_what_fits_and_the_pinned_first() -> None:
    loader = Loader()
    models = pool(loader, max_loaded_models=2, pinned=["c"])
    models.load_at_start(["a", "b", "c"])
    assert [m for m, _ in loader.loads] == ["c", "a"]
    assert set(models.stats().loaded) == {"a", "c"}


@pytest.mark.asyncio
async def test_an_unloaded_model_is_loaded_evicting_the_least_recently_used_idle_one() -> None:
    loader = Loader()
    models = pool(loader, max_loaded_models=2)
    models.load_at_start(["a", "b"])
    models.release(await models.acquire("a", wait_s=5))  # b is now the least recently used
    serving = await models.acquire("c", wait_s=5)
    models.release(serving)
    stats = models.stats()
    assert stats.loaded == ("a", "c")
    assert (stats.loads, stats.evictions) == (3, 1)
    assert stats.load_seconds > 0
    assert stats.loaded_bytes == 2 * MODEL_BYTES


@pytest.mark.asyncio
async def test_reloaded_weights_answer_the_same() -> None:
    models = pool(Loader(), max_loaded_models=1)
    models.load_at_start(["a"])
    tokens = torch.tensor([1, 2, 3])
    first = await models.acquire("a", wait_s=5)
    logits, _ = first.model.prefill(tokens)
    models.release(first)
    models.release(await models.acquire("b", wait_s=5))  # evicts a
    again = await models.acquire("a", wait_s=5)
    assert again is not first
    assert torch.equal(again.model.prefill(tokens)[0], logits)
    models.release(again)


@pytest.mark.asyncio
async def test_concurrent_requests_for_an_unloaded_model_wait_for_one_load() -> None:
    loader = Loader()
    models = pool(loader)
    loader.gate.clear()
    waiters = [asyncio.create_task(models.acquire("b", wait_s=5)) for _ in range(8)]
    await asyncio.sleep(0.05)
    loader.gate.set()
    servings = await asyncio.gather(*waiters)
    assert loader.loads == [("b", "1")]
    assert len({id(s) for s in servings}) == 1
    assert servings[0].inflight == 8
    for serving in servings:
        models.release(serving)


@pytest.mark.asyncio
async def test_a_busy_model_is_not_evicted_and_the_request_waits_for_room() -> None:
    models = pool(Loader(), max_loaded_models=1)
    models.load_at_start(["a"])
    busy = await models.acquire("a", wait_s=5)
    waiting = asyncio.create_task(models.acquire("b", wait_s=5))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    assert models.stats().waits_for_room == 1
    models.release(busy)
    serving = await asyncio.wait_for(waiting, 5)
    assert serving.record.model == "b"
    assert busy.retired  # evicted once idle
    models.release(serving)


@pytest.mark.asyncio
async def test_no_room_in_time_is_a_503_naming_the_model() -> None:
    models = pool(Loader(), max_loaded_models=1)
    models.load_at_start(["a"])
    busy = await models.acquire("a", wait_s=5)
    started = time.monotonic()
    with pytest.raises(ModelLoading) as refused:
        await models.acquire("b", wait_s=0.2)
    assert 0.2 <= time.monotonic() - started < 2
    assert refused.value.param == "model" and refused.value.http_status == 503
    models.release(busy)


@pytest.mark.asyncio
async def test_pinned_models_are_never_evicted() -> None:
    models = pool(Loader(), max_loaded_models=2, pinned=["a"])
    models.load_at_start(["a"])
    for name in ("b", "c", "b", "c"):
        models.release(await models.acquire(name, wait_s=5))
    stats = models.stats()
    assert "a" in stats.loaded and stats.evictions == 3


@pytest.mark.asyncio
async def test_the_byte_budget_holds_the_measured_sizes() -> None:
    models = pool(Loader(), max_model_bytes=2 * MODEL_BYTES)
    for name in ("a", "b", "c", "a"):
        models.release(await models.acquire(name, wait_s=5))
        assert models.stats().loaded_bytes <= 2 * MODEL_BYTES
    assert models.stats().evictions == 2


@pytest.mark.asyncio
async def test_a_load_that_fails_is_a_503_and_is_retried_by_the_next_request() -> None:
    loader = Loader()
    models = pool(loader)
    loader.fail.add("a")
    with pytest.raises(ModelLoading, match="cannot read the weights"):
        await models.acquire("a", wait_s=5)
    assert models.stats().load_failures == 1
    loader.fail.clear()
    models.release(await models.acquire("a", wait_s=5))
    assert models.stats().loads == 1


@pytest.mark.asyncio
async def test_a_version_published_while_unloaded_is_served_at_the_next_load() -> None:
    loader = Loader()
    models = pool(loader, max_loaded_models=1)
    models.load_at_start(["a"])
    record = ModelVersion("b", "2", generation=1, source="admin", seed=99)
    assert models.switch(record) is None  # not loaded: recorded only
    serving = await models.acquire("b", wait_s=5)
    assert serving.record == record and loader.loads[-1] == ("b", "2")
    expected = load_model(weights_spec(SPECS["b"], record))
    tokens = torch.tensor([4, 5])
    assert torch.equal(serving.model.prefill(tokens)[0], expected.prefill(tokens)[0])
    models.release(serving)


@pytest.mark.asyncio
async def test_a_switch_of_a_loaded_model_swaps_and_retires_the_old_weights() -> None:
    models = pool(Loader())
    models.load_at_start(["a"])
    old = await models.acquire("a", wait_s=5)
    record = ModelVersion("a", "2", generation=1, source="admin", seed=7)
    retired = await asyncio.to_thread(models.switch, record)
    assert retired is old and old.retired and old.inflight == 1
    new = await models.acquire("a", wait_s=5)
    assert new.record == record
    models.release(old)
    assert old.wait_drained(1)
    models.release(new)


@pytest.mark.asyncio
async def test_a_load_that_finishes_after_a_newer_version_loads_that_one() -> None:
    loader = Loader()
    models = pool(loader)
    loader.gate.clear()
    waiting = asyncio.create_task(models.acquire("a", wait_s=5))
    await asyncio.sleep(0.05)  # the load of version 1 has begun
    record = ModelVersion("a", "2", generation=1, source="admin", seed=7)
    assert models.switch(record) is None
    loader.gate.set()
    serving = await waiting
    assert serving.record == record
    assert loader.loads == [("a", "1"), ("a", "2")]
    models.release(serving)


def test_a_switch_whose_weights_do_not_load_changes_nothing() -> None:
    loader = Loader()
    models = pool(loader)
    models.load_at_start(["a"])
    before = models.loaded("a")
    loader.fail.add("a")
    with pytest.raises(OSError):
        models.switch(ModelVersion("a", "2", generation=1, source="admin", seed=7))
    assert models.record("a").version == "1"
    assert models.loaded("a") is before and before is not None and not before.retired


@pytest.mark.asyncio
async def test_a_model_evicted_during_its_switch_loads_the_new_version_next() -> None:
    loader = Loader()
    models = pool(loader, max_loaded_models=1)
    models.load_at_start(["a"])
    loader.gate.clear()  # the switch's load of version 2 waits
    record = ModelVersion("a", "2", generation=1, source="admin", seed=7)
    switch = asyncio.create_task(asyncio.to_thread(models.switch, record))
    await asyncio.sleep(0.05)
    loading_b = asyncio.create_task(models.acquire("b", wait_s=5))  # evicts a (idle)
    await asyncio.sleep(0.05)
    loader.gate.set()
    models.release(await loading_b)
    await switch
    serving = await models.acquire("a", wait_s=5)
    assert serving.record == record
    models.release(serving)


@pytest.mark.asyncio
async def test_a_fresh_load_is_not_evicted_before_its_waiters_take_it() -> None:
    loader = Loader()
    models = pool(loader, max_loaded_models=1)
    loader.gate.clear()
    first = asyncio.create_task(models.acquire("a", wait_s=10))
    await asyncio.sleep(0.05)
    second = asyncio.create_task(models.acquire("b", wait_s=10))  # no room until a is idle
    await asyncio.sleep(0.05)
    loader.gate.set()
    serving_a = await first
    assert serving_a.record.model == "a" and not serving_a.retired
    models.release(serving_a)
    serving_b = await second
    models.release(serving_b)
    assert [m for m, _ in loader.loads] == ["a", "b"]


@pytest.mark.asyncio
async def test_a_load_that_takes_too_long_is_a_503_and_still_lands() -> None:
    loader = Loader()
    models = pool(loader)
    loader.gate.clear()
    with pytest.raises(ModelLoading, match="still loading"):
        await models.acquire("a", wait_s=0.1)
    loader.gate.set()
    models.release(await models.acquire("a", wait_s=5))
    assert loader.loads == [("a", "1")]


def test_switching_again_to_the_version_served_changes_nothing() -> None:
    loader = Loader()
    models = pool(loader)
    models.load_at_start(["a"])
    record = ModelVersion("a", "2", generation=1, source="admin", seed=7)
    assert models.switch(record) is not None
    serving = models.loaded("a")
    assert models.switch(record) is None  # a retried apply
    assert models.loaded("a") is serving and serving is not None and not serving.retired
    assert len(loader.loads) == 2


def test_a_version_of_an_unloaded_model_whose_weights_cannot_be_found_is_refused() -> None:
    def check(record: ModelVersion) -> None:
        if record.version == "missing":
            raise FileNotFoundError("no checkpoint file")

    models = ModelPool(
        {name: config_version(spec) for name, spec in SPECS.items()},
        Loader(),
        lambda model: MODEL_BYTES,
        check=check,
    )
    with pytest.raises(FileNotFoundError):
        models.switch(ModelVersion("a", "missing", generation=1, source="admin", seed=1))
    assert models.record("a").version == "1"


@pytest.fixture
def no_garbage_collection() -> Iterator[None]:
    """Weights must be freed by reference counting alone, when their last user lets go."""
    gc.disable()
    yield
    gc.enable()


@pytest.mark.asyncio
@pytest.mark.usefixtures("no_garbage_collection")
async def test_a_replaced_versions_heap_is_returned_once_its_last_generation_ends() -> None:
    freed = threading.Event()
    models = pool(Loader(), on_weights_freed=freed.set)
    models.load_at_start(["a"])
    old = await models.acquire("a", wait_s=5)
    weights = weakref.ref(old.model)
    old.hold()  # a generation that outlives its request
    models.release(old)
    record = ModelVersion("a", "2", generation=1, source="admin", seed=7)
    assert await asyncio.to_thread(models.switch, record) is old
    await asyncio.sleep(0.05)
    assert weights() is not None and not freed.is_set()  # the generation still uses them
    models.release(old)  # the generation ends
    del old
    assert weights() is None
    assert await asyncio.to_thread(freed.wait, 5)
    models.close()


@pytest.mark.asyncio
@pytest.mark.usefixtures("no_garbage_collection")
async def test_an_evicted_models_heap_is_returned_once_its_weights_are_freed() -> None:
    freed = threading.Event()
    models = pool(Loader(), max_loaded_models=1, on_weights_freed=freed.set)
    models.load_at_start(["a"])
    loaded = models.loaded("a")
    assert loaded is not None
    weights = weakref.ref(loaded.model)
    del loaded
    models.release(await models.acquire("b", wait_s=5))  # evicts a, idle
    assert weights() is None
    assert await asyncio.to_thread(freed.wait, 5)
    models.close()


@pytest.mark.asyncio
@pytest.mark.usefixtures("no_garbage_collection")
async def test_weights_freed_by_a_collection_inside_a_thread_pools_submit_do_not_deadlock(
    monkeypatch,
) -> None:
    """Weights held in a reference cycle are freed by whichever garbage collection comes next,
    also one inside another thread pool's `submit`, which holds a lock every pool's `submit`
    takes: what their finalizer does must not need it."""
    freed = threading.Event()
    models = pool(Loader(), max_loaded_models=1, on_weights_freed=freed.set)
    models.load_at_start(["a"])
    loaded = models.loaded("a")
    assert loaded is not None
    cycle: list[object] = [loaded.model]
    cycle.append(cycle)
    del loaded
    models.release(await models.acquire("b", wait_s=5))  # evicts a: only the cycle holds it
    del cycle
    original = concurrent.futures.Future.__init__

    def collecting(self: concurrent.futures.Future) -> None:  # a collection an allocation starts
        original(self)
        monkeypatch.setattr(concurrent.futures.Future, "__init__", original)
        gc.collect()

    monkeypatch.setattr(concurrent.futures.Future, "__init__", collecting)
    other = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    submitting = threading.Thread(target=lambda: other.submit(int).result(), daemon=True)
    submitting.start()
    submitting.join(5)
    assert not submitting.is_alive(), "the finalizer deadlocked the submit"
    assert await asyncio.to_thread(freed.wait, 5)
    other.shutdown()
    models.close()
