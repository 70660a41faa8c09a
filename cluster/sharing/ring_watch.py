"""The directory's ring, followed from any process: the replicas' and the router's one ring.

`RingWatcher` long-polls the directory actor's `watch` in a daemon thread and swaps in each new
`RingSnapshot` whole, so reads (`snapshot`, `ring`, `owner`) are lock-free and the directory is
never on a request's path. The ring is the directory's: members under live leases, weighted,
without the replicas the version actor excluded. Every failure is logged and retried after a
pause, with the actor looked up afresh: a directory that restarts must not take its readers
down with it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, cast

import ray
from ray.actor import ActorHandle

from cluster.sharing.directory import Member, RingSnapshot
from cluster.sharing.directory_actor import ACTOR_NAMESPACE, directory_name
from cluster.sharing.ring import Ring

logger = logging.getLogger(__name__)

CALL_TIMEOUT_S = 5.0
WATCH_TIMEOUT_S = 10.0
RETRY_PAUSE_S = 0.5


class RingWatcher:
    """Keeps the latest ring snapshot of the directory that `resolve()` returns."""

    def __init__(
        self,
        resolve: Callable[[], ActorHandle[Any]],
        forget: Callable[[], None],
        stopped: threading.Event | None = None,
    ) -> None:
        """`forget()` drops a cached actor handle after a failed call, so that the next
        `resolve()` looks the actor up again; `stopped` ends the watch when set."""
        self._resolve = resolve
        self._forget = forget
        self._stopped = stopped or threading.Event()
        # One tuple, replaced whole: a reader never pairs a snapshot with another's ring.
        self._state: tuple[RingSnapshot | None, Ring] = (None, Ring())
        self._thread = threading.Thread(
            target=self._watch_forever, name="raycache-ring-watch", daemon=True
        )

    @classmethod
    def of_namespace(cls, namespace: str) -> RingWatcher:
        """A watcher of the directory of raycache namespace `namespace` (not started). It
        only reads: until a replica has created the directory, it finds none and retries."""
        handles: list[ActorHandle[Any]] = []

        def resolve() -> ActorHandle[Any]:
            if not handles:
                handles.append(ray.get_actor(directory_name(namespace), namespace=ACTOR_NAMESPACE))
            return handles[0]

        return cls(resolve, handles.clear)

    @property
    def snapshot(self) -> RingSnapshot | None:
        """The latest membership seen, or None before the first one arrives."""
        return self._state[0]

    def ring(self) -> Ring:
        """The ring of the latest snapshot (empty before the first one)."""
        return self._state[1]

    def owner(self, routing_key: str) -> Member | None:
        """The member owning `routing_key` on the latest ring (None before the first)."""
        snapshot, ring = self._state
        if snapshot is None:
            return None
        return snapshot.member(ring.owner(routing_key) or "")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _watch_forever(self) -> None:
        # A driver that shuts Ray down (a test process, a script holding a handle) ends this.
        while not self._stopped.is_set() and ray.is_initialized():
            known = self._state[0]
            epoch, version = (known.epoch, known.version) if known else ("", -1)
            try:
                snapshot = cast(
                    RingSnapshot,
                    ray.get(
                        self._resolve().watch.remote(epoch, version, WATCH_TIMEOUT_S),
                        timeout=WATCH_TIMEOUT_S + CALL_TIMEOUT_S,
                    ),
                )
            except SystemExit:  # Ray raises it in every thread of a worker shutting down
                return
            except Exception:  # retried after a pause
                logger.info("ring watch failed; retrying", exc_info=True)
                self._forget()
                self._stopped.wait(RETRY_PAUSE_S)
                continue
            if (snapshot.epoch, snapshot.version) != (epoch, version):
                self._state = (snapshot, snapshot.ring())
