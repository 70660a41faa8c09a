"""The replica side of the directory: stay registered, report stats, follow the ring.

Two daemon threads, so that membership keeps working while the replica's event loop is busy
and before the first request arrives:

- the heartbeat renews the lease every `interval_s` (carrying the replica's stats) and
  registers again whenever the directory does not know the replica (lapsed lease, restart);
- the watcher long-polls the directory's `watch` and swaps in each new `RingSnapshot`, so
  owners are computed locally from `ring()` and the directory is never on a request's path.

Every failure is logged and retried: a directory that is restarting must never take a replica
down with it. Reads of `snapshot`/`ring()` are lock-free: the snapshot is replaced whole.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, cast

import ray
from ray.actor import ActorHandle

from cluster.directory import Member, RingSnapshot
from cluster.directory_actor import directory_actor
from cluster.ring import Ring

logger = logging.getLogger(__name__)

CALL_TIMEOUT_S = 5.0
WATCH_TIMEOUT_S = 10.0
RETRY_PAUSE_S = 0.5


class Membership:
    """Keeps `member` registered in the directory of `namespace` and its ring snapshot fresh."""

    def __init__(
        self,
        namespace: str,
        member: Member,
        stats: Callable[[], Mapping[str, Any]],
        interval_s: float,
        lease_s: float = 10.0,
    ) -> None:
        self.member = member
        self._namespace = namespace
        self._stats = stats
        self._interval_s = interval_s
        self._lease_s = lease_s
        self._directory: ActorHandle[Any] | None = None
        self._snapshot: RingSnapshot | None = None
        self._ring = Ring()
        self._stopped = threading.Event()
        self._threads = [
            threading.Thread(target=self._beat_forever, name="raycache-heartbeat", daemon=True),
            threading.Thread(target=self._watch_forever, name="raycache-ring-watch", daemon=True),
        ]

    @property
    def snapshot(self) -> RingSnapshot | None:
        """The latest membership seen, or None before the first one arrives."""
        return self._snapshot

    def ring(self) -> Ring:
        """The ring of the latest snapshot (empty before the first one)."""
        return self._ring

    def start(self) -> None:
        """Register now (best effort) and keep membership current in the background."""
        self._beat()
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop and leave the directory (best effort)."""
        self._stopped.set()
        try:
            ray.get(
                self._resolve().deregister.remote(self.member.replica_id), timeout=CALL_TIMEOUT_S
            )
        except Exception:  # the lease lapses on its own if this fails
            logger.info("could not deregister %s; its lease will lapse", self.member.replica_id)

    def _resolve(self) -> ActorHandle[Any]:
        if self._directory is None:
            self._directory = directory_actor(self._namespace, self._lease_s)
        return self._directory

    def _beat_forever(self) -> None:
        while not self._stopped.wait(self._interval_s):
            self._beat()

    def _beat(self) -> None:
        try:
            directory = self._resolve()
            replica_id = self.member.replica_id
            renewed = bool(
                ray.get(
                    directory.heartbeat.remote(replica_id, dict(self._stats())),
                    timeout=CALL_TIMEOUT_S,
                )
            )
            if not renewed:
                ray.get(directory.register.remote(self.member), timeout=CALL_TIMEOUT_S)
                ray.get(
                    directory.heartbeat.remote(replica_id, dict(self._stats())),
                    timeout=CALL_TIMEOUT_S,
                )
        except Exception:  # retried on the next beat
            logger.warning("heartbeat of %s failed", self.member.replica_id, exc_info=True)
            self._directory = None  # the actor may be gone for good: look it up afresh

    def _watch_forever(self) -> None:
        while not self._stopped.is_set():
            known = self._snapshot
            epoch, version = (known.epoch, known.version) if known else ("", -1)
            try:
                snapshot = cast(
                    RingSnapshot,
                    ray.get(
                        self._resolve().watch.remote(epoch, version, WATCH_TIMEOUT_S),
                        timeout=WATCH_TIMEOUT_S + CALL_TIMEOUT_S,
                    ),
                )
            except Exception:  # retried after a pause
                logger.info("ring watch failed; retrying", exc_info=True)
                self._directory = None
                self._stopped.wait(RETRY_PAUSE_S)
                continue
            if (snapshot.epoch, snapshot.version) != (epoch, version):
                self._ring = snapshot.ring()
                self._snapshot = snapshot
