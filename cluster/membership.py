"""The replica side of the directory: stay registered, renew the lease, report stats.

A daemon thread, so that heartbeats keep flowing while the replica's event loop is busy and
before the first request arrives. Every failure is logged and retried on the next beat: a
directory that is restarting must never take a replica down with it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import ray
from ray.actor import ActorHandle

from cluster.directory import Member
from cluster.directory_actor import directory_actor

logger = logging.getLogger(__name__)

CALL_TIMEOUT_S = 5.0


class MembershipHeartbeat:
    """Registers `member` with the directory of `namespace` and renews it every `interval_s`."""

    def __init__(
        self,
        namespace: str,
        member: Member,
        stats: Callable[[], Mapping[str, Any]],
        interval_s: float,
        lease_s: float = 10.0,
    ) -> None:
        self._namespace = namespace
        self._member = member
        self._stats = stats
        self._interval_s = interval_s
        self._lease_s = lease_s
        self._directory: ActorHandle[Any] | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"heartbeat-{member.replica_id}", daemon=True
        )

    def start(self) -> None:
        """Register now (best effort) and keep the lease renewed in the background."""
        self._beat()
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing and leave the directory (best effort)."""
        self._stopped.set()
        try:
            ray.get(
                self._resolve().deregister.remote(self._member.replica_id), timeout=CALL_TIMEOUT_S
            )
        except Exception:
            logger.info("could not deregister %s; its lease will lapse", self._member.replica_id)

    def _run(self) -> None:
        while not self._stopped.wait(self._interval_s):
            self._beat()

    def _resolve(self) -> ActorHandle[Any]:
        if self._directory is None:
            self._directory = directory_actor(self._namespace, self._lease_s)
        return self._directory

    def _beat(self) -> None:
        try:
            directory = self._resolve()
            renewed = bool(
                ray.get(
                    directory.heartbeat.remote(self._member.replica_id, dict(self._stats())),
                    timeout=CALL_TIMEOUT_S,
                )
            )
            if not renewed:
                ray.get(directory.register.remote(self._member), timeout=CALL_TIMEOUT_S)
                ray.get(
                    directory.heartbeat.remote(self._member.replica_id, dict(self._stats())),
                    timeout=CALL_TIMEOUT_S,
                )
        except Exception:
            self._directory = None  # the actor may be gone for good: look it up afresh
            logger.warning("heartbeat of %s failed", self._member.replica_id, exc_info=True)
