"""The models a replica holds in memory: loaded on demand, the least recently used idle one
evicted to make room.

A replica serves every configured model but holds at most `max_loaded_models` of them, and at
most `max_model_bytes` of weights, at once. `acquire(model)` returns the model's current
`ServingModel`, entered (hand it back with `release`):

- at once when it is loaded;
- otherwise after one load, however many requests ask for it meanwhile: the load runs in the
  pool's own worker thread (not behind generation), after room was made by evicting the least
  recently used models that no request is using (nor waiting for: a fresh load is kept for
  the requests that waited for it). When every loaded model is busy, the request waits for one
  to become idle. Room and the load together take at most `wait_s`, then `ModelLoading` (503).

A request's computation may outlive the request (a client that disconnects): it `hold`s the
weights until it ends, so they are neither evicted nor drained under it.

Pinned models are loaded at start and never evicted. Room is made for a model's measured size
when it was loaded before, else for an estimate from its config (`weight_bytes_estimate`,
computed once per version); after a load the measured size counts, and more idle models go when
it was larger.

Versions: the pool keeps each model's current `ModelVersion` whether it is loaded or not.
`switch(record)` on a loaded model loads the new weights beside the old ones, swaps them and
retires the old (the caller drains them); on a model that is not loaded it checks that the
weights can be found and records the version, which its next load serves. A load that finishes
after a newer version was recorded loads again, so no request is served by weights older than
the version the pool knows.

Memory: weights the pool lets go of (evicted, replaced by a new version, or loaded and not
needed) are freed once nothing references them, when their last request is done; then, in a
thread of the pool's own, `on_weights_freed` runs, by default `return_free_heap`: malloc would
otherwise keep their pages, and a replica would stay as large as it was with both versions
loaded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from cluster.versions.records import ModelVersion
from serve_app.errors import ModelLoading
from serve_app.models import CausalLM
from serve_app.replica.change_signal import ChangeSignal
from serve_app.replica.free_heap import return_free_heap
from serve_app.replica.serving import ServingModel

logger = logging.getLogger(__name__)

LoadWeights = Callable[[ModelVersion], CausalLM]
"""Builds the weights of a version (blocking: reads files, allocates tensors)."""
# Loading is I/O and allocation; one at a time keeps two loads from doubling the peak memory.
_LOAD_WORKERS: Final = 1


@dataclass(frozen=True)
class PoolStats:
    """What the pool did since the replica started."""

    loaded: tuple[str, ...]
    """Models in memory now, least recently used first."""
    loaded_bytes: int
    loads: int
    load_failures: int
    evictions: int
    load_seconds: float
    waits_for_room: int
    """Requests that found every loaded model busy and waited for one to become idle."""

    def as_json(self) -> dict[str, object]:
        return {
            "loaded": list(self.loaded),
            "loaded_bytes": self.loaded_bytes,
            "loads": self.loads,
            "load_failures": self.load_failures,
            "evictions": self.evictions,
            "load_seconds": round(self.load_seconds, 6),
            "waits_for_room": self.waits_for_room,
        }


class ModelPool:
    """The loaded models of one replica under a count and a byte budget; see the module."""

    def __init__(
        self,
        versions: Mapping[str, ModelVersion],
        load: LoadWeights,
        estimate_bytes: Callable[[str], int],
        max_loaded_models: int | None = None,
        max_model_bytes: int | None = None,
        pinned: Iterable[str] = (),
        on_loaded: Callable[[ServingModel], None] | None = None,
        check: Callable[[ModelVersion], None] | None = None,
        on_weights_freed: Callable[[], object] = return_free_heap,
    ) -> None:
        """`versions`: the current version of every model served; `estimate_bytes(model)`:
        its weights' size before its first load; `on_loaded(serving)`: called in the loading
        thread with new weights before any request uses them (to warm pinned prompts);
        `check(record)`: raises when a version's weights cannot be found, without loading
        them (a version of a model not in memory is checked so, then recorded);
        `on_weights_freed()`: called in a thread of the pool's own after weights the pool let
        go of were freed (once for several freed together)."""
        self._records = dict(versions)
        self._load_weights = load
        self._estimate_bytes = estimate_bytes
        self._max_models = max_loaded_models
        self._max_bytes = max_model_bytes
        self._pinned = frozenset(pinned)
        self._on_loaded = on_loaded
        self._check = check or (lambda _record: None)
        self._on_weights_freed = on_weights_freed
        self._lock = threading.Lock()
        self._loaded: OrderedDict[str, ServingModel] = OrderedDict()
        self._loading: dict[str, concurrent.futures.Future[ServingModel]] = {}
        self._awaiting: dict[str, int] = {}  # requests waiting for each model's load
        # Measured once loaded, estimated before: loaded models always have their measured size.
        self._sizes: dict[str, int] = {}
        self._changed = ChangeSignal()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=_LOAD_WORKERS, thread_name_prefix="raycache-load"
        )
        # Weights freed (True) or the pool closed (None). A finalizer may run inside a garbage
        # collection in any thread, even one holding a lock of a thread pool's `submit`: it
        # only puts into this queue, which takes no lock.
        self._freed: queue.SimpleQueue[bool | None] = queue.SimpleQueue()
        threading.Thread(target=self._return_heap, name="raycache-heap", daemon=True).start()
        self._loads = 0
        self._load_failures = 0
        self._evictions = 0
        self._load_seconds = 0.0
        self._waits_for_room = 0

    # -- state --------------------------------------------------------------------------------

    def record(self, model: str) -> ModelVersion:
        """The version `model` serves (loaded or not); KeyError for a model not served."""
        return self._records[model]

    def records(self) -> dict[str, ModelVersion]:
        return dict(self._records)

    def loaded(self, model: str) -> ServingModel | None:
        """`model`'s weights when they are in memory."""
        return self._loaded.get(model)

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(
                loaded=tuple(self._loaded),
                loaded_bytes=sum(self._sizes.get(m, 0) for m in self._loaded),
                loads=self._loads,
                load_failures=self._load_failures,
                evictions=self._evictions,
                load_seconds=self._load_seconds,
                waits_for_room=self._waits_for_room,
            )

    # -- loading ------------------------------------------------------------------------------

    def load_at_start(self, models: Iterable[str]) -> None:
        """Load the pinned models, then `models` in order while they fit without evicting
        (blocking; a replica's constructor calls it in a worker thread)."""
        ordered = sorted(self._pinned) + [m for m in models if m not in self._pinned]
        for model in ordered:
            with self._lock:
                fits = model in self._pinned or self._fits(model, evictable=[])
            if fits:
                self._load(model)

    def take(self, model: str) -> ServingModel | None:
        """`model`'s current weights, entered, when they are in memory; else None (then
        `acquire`). The hit path: no coroutine, one lock."""
        with self._lock:
            serving = self._loaded.get(model)
            if serving is not None and serving.enter():
                self._loaded.move_to_end(model)
                return serving
        return None

    async def acquire(self, model: str, wait_s: float) -> ServingModel:
        """`model`'s current weights, entered: `release` them when done. Loads them when they
        are not in memory; raises `ModelLoading` when that fails, or when neither room nor
        the load came within `wait_s`; KeyError for a model not served."""
        deadline = time.monotonic() + wait_s
        counted_wait = False
        awaiting = False  # counted in `_awaiting[model]`, so a fresh load is not evicted
        try:
            while True:
                seen = self._changed.seq
                with self._lock:
                    if awaiting:
                        self._awaiting[model] -= 1
                        awaiting = False
                    serving = self._loaded.get(model)
                    if serving is not None and serving.enter():
                        self._loaded.move_to_end(model)
                        return serving
                    flight = self._loading.get(model)
                    if flight is None and self._room_for(model):
                        flight = self._start_load(model)
                    if flight is not None:
                        self._awaiting[model] = self._awaiting.get(model, 0) + 1
                        awaiting = True
                    elif not counted_wait:
                        self._waits_for_room += 1
                        counted_wait = True
                remaining = deadline - time.monotonic()
                if flight is not None:
                    await self._await_load(model, flight, remaining)
                    continue  # take it from the pool: it may have been switched meanwhile
                if not await self._changed.wait_past(seen, remaining):
                    raise ModelLoading(
                        f"model {model!r} is not loaded and every loaded model is in use; "
                        "retry shortly",
                        param="model",
                    )
        finally:
            if awaiting:
                with self._lock:
                    self._awaiting[model] -= 1

    async def _await_load(
        self, model: str, flight: concurrent.futures.Future[ServingModel], timeout_s: float
    ) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(flight)), max(timeout_s, 0))
        except TimeoutError:
            raise ModelLoading(
                f"model {model!r} is still loading; retry shortly", param="model"
            ) from None
        except Exception as exc:
            raise ModelLoading(
                f"model {model!r} could not be loaded: {exc}", param="model"
            ) from exc

    def release(self, serving: ServingModel) -> None:
        """A request that `acquire`d `serving` is done with it."""
        serving.leave()
        if serving.inflight == 0:
            self._changed.notify()  # it may be the idle model a waiting load evicts

    def switch(self, record: ModelVersion) -> ServingModel | None:
        """Make `record` the version of its model (blocking, in the caller's thread). Loaded:
        load its weights, swap them in, and return the old ones, retired (drain them). Not
        loaded: check that its weights can be found (`check`) and record it for the next
        load; return None. Raises when the weights do not load or check; then nothing
        changed. A version already served is left as it is."""
        model = record.model
        with self._lock:
            current = self._loaded.get(model)
            if current is not None and current.record.generation == record.generation:
                return None  # applied already (a retry of a switch that got this far)
        if current is None:
            self._check(record)
        with self._lock:
            # Recorded first, so that a load that starts meanwhile (after an eviction) loads
            # this version, not the one being replaced.
            previous = self._records[model]
            self._records[model] = record
            current = self._loaded.get(model)
            if current is None:
                self._sizes.pop(model, None)  # the old version's size; the new one may differ
        if current is None:
            self._changed.notify()
            return None
        try:
            serving = self._build(record)
        except Exception:
            with self._lock:
                if self._records[model] is record:
                    self._records[model] = previous
            raise
        with self._lock:
            present = self._loaded.get(model)
            if present is not None and present.record.generation != record.generation:
                self._install(model, serving)  # keeps its place in the LRU order
            # Otherwise it was evicted meanwhile (the next load reads `record`), or reloaded
            # at `record` already: these weights are not needed.
            stale = {current, present, serving} - {self._loaded.get(model), None}
        for old in stale:
            self._let_go(old)
        self._changed.notify()
        return current

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._freed.put(None)

    # -- under the lock -----------------------------------------------------------------------

    def _start_load(self, model: str) -> concurrent.futures.Future[ServingModel]:
        flight = self._executor.submit(self._load, model)
        self._loading[model] = flight
        return flight

    def _room_for(self, model: str) -> bool:
        """`_make_room`, with a failure to size the model (its config unreadable) a 503."""
        try:
            return self._make_room(model)
        except Exception as exc:
            raise ModelLoading(f"model {model!r} could not be sized: {exc}", param="model") from exc

    def _make_room(self, model: str) -> bool:
        """Evict idle models until `model` fits; False (nothing evicted) when it cannot."""
        idle = [m for m, serving in self._loaded.items() if m != model and self._idle(m, serving)]
        for count in range(len(idle) + 1):
            if self._fits(model, evictable=idle[:count]):
                for victim in idle[:count]:
                    self._evict(victim)
                return True
        return False

    def _fits(self, model: str, evictable: list[str]) -> bool:
        """Whether `model` fits once `evictable` are gone (loads in flight hold their room)."""
        held = [m for m in self._loaded if m not in evictable and m != model]
        held += [m for m in self._loading if m != model and m not in held]
        if self._max_models is not None and len(held) + 1 > self._max_models:
            return False
        if self._max_bytes is None:
            return True
        return sum(self._size(m) for m in held) + self._size(model) <= self._max_bytes

    def _size(self, model: str) -> int:
        """The measured size of `model`'s weights, or its estimate before the first load."""
        size = self._sizes.get(model)
        if size is None:
            size = self._sizes[model] = self._estimate_bytes(model)
        return size

    def _idle(self, model: str, serving: ServingModel) -> bool:
        """Whether `serving` may be evicted: not pinned, no request using it or waiting for
        it (a fresh load is kept for the requests that waited for it)."""
        return model not in self._pinned and serving.inflight == 0 and not self._awaiting.get(model)

    def _install(self, model: str, serving: ServingModel) -> None:
        """Serve `model` from `serving`, counting its measured size."""
        self._loaded[model] = serving
        self._sizes[model] = serving.model_bytes
        self._evict_over_budget(keep=model)

    def _evict(self, model: str) -> None:
        serving = self._loaded.pop(model)
        self._let_go(serving)
        self._evictions += 1
        logger.info("evicted model %s (%d bytes)", model, self._sizes.get(model, 0))

    def _evict_over_budget(self, keep: str) -> None:
        """After a load measured larger than its estimate: evict idle models until the loaded
        ones fit the byte budget again (or none is idle)."""
        if self._max_bytes is None:
            return
        for model, serving in list(self._loaded.items()):
            total = sum(self._sizes.get(m, 0) for m in self._loaded)
            if total <= self._max_bytes:
                return
            if model != keep and self._idle(model, serving):
                self._evict(model)

    def _let_go(self, serving: ServingModel) -> None:
        """Retire `serving` (no request enters it any more) and have the heap returned once
        its weights are freed: a request in flight, or a computation that outlived its request,
        still uses them until it ends."""
        if serving.retired:
            return  # let go of already (evicted during a switch): one finalizer is enough
        serving.retire()
        # The finalizer runs as the last reference goes, in whichever thread drops it, usually
        # just before the tensors are freed: a trim that comes too early returns less.
        freed = weakref.finalize(serving.model, self._freed.put, True)
        freed.atexit = False

    def _return_heap(self) -> None:
        """Run `on_weights_freed` after each batch of freed weights, until the pool closes."""
        while self._freed.get():
            while not self._freed.empty():
                if self._freed.get() is None:
                    return
            try:
                self._on_weights_freed()
            except Exception:  # a failed trim costs memory, never the pool
                logger.exception("returning the free heap failed")

    # -- in the loading thread ----------------------------------------------------------------

    def _load(self, model: str) -> ServingModel:
        """Load `model` at its current version and put it in the pool; loads again when a
        newer version was recorded meanwhile."""
        try:
            while True:
                record = self._records[model]
                started = time.monotonic()
                try:
                    serving = self._build(record)
                except Exception:
                    with self._lock:
                        self._load_failures += 1
                    logger.exception("could not load model %s version %s", model, record.version)
                    raise
                with self._lock:
                    self._loads += 1
                    self._load_seconds += time.monotonic() - started
                    if self._records[model].generation != record.generation:
                        self._let_go(serving)
                        continue
                    self._install(model, serving)
                logger.info(
                    "loaded model %s version %s in %.2f s",
                    model,
                    record.version,
                    time.monotonic() - started,
                )
                return serving
        finally:
            with self._lock:
                self._loading.pop(model, None)
            self._changed.notify()

    def _build(self, record: ModelVersion) -> ServingModel:
        serving = ServingModel(self._load_weights(record), record)
        if self._on_loaded is not None:
            self._on_loaded(serving)
        return serving
