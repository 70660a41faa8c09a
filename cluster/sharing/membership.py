"""The replica side of the directory: stay registered, report stats, follow the ring.

Two daemon threads, so that membership keeps working while the replica's event loop is busy
and before the first request arrives:

- the heartbeat renews the lease every `interval_s` (carrying the replica's stats) and
  registers again whenever the directory does not know the replica (lapsed lease, restart);
- the `RingWatcher` follows the directory's ring, so owners are computed locally from
  `ring()` and the directory is never on a request's path.

Every failure is logged and retried: a directory that is restarting must never take a replica
down with it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import ray
from ray.actor import ActorHandle

from cluster.sharing.directory import Member, RingSnapshot
from cluster.sharing.directory_actor import directory_actor
from cluster.sharing.ring import Ring
from cluster.sharing.ring_watch import CALL_TIMEOUT_S, RingWatcher

logger = logging.getLogger(__name__)


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
        self._stopped = threading.Event()
        self._ring_watch = RingWatcher(self._resolve, self._forget, self._stopped)
        self._heartbeat = threading.Thread(
            target=self._beat_forever, name="raycache-heartbeat", daemon=True
        )

    @property
    def snapshot(self) -> RingSnapshot | None:
        """The latest membership seen, or None before the first one arrives."""
        return self._ring_watch.snapshot

    def ring(self) -> Ring:
        """The ring of the latest snapshot (empty before the first one)."""
        return self._ring_watch.ring()

    def owner(self, routing_key: str) -> Member | None:
        """The member owning `routing_key` on the latest ring (None before the first)."""
        return self._ring_watch.owner(routing_key)

    def start(self) -> None:
        """Register now (best effort) and keep membership current in the background."""
        self._beat()
        self._heartbeat.start()
        self._ring_watch.start()

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

    def _forget(self) -> None:
        self._directory = None  # the actor may be gone for good: look it up afresh

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
            self._forget()
