"""How much each tenant may write to the shared tiers (Redis, owner peers) from one replica.

Every tenant's writes draw on a bucket of its own: `bytes_per_s` flow in, up to
`burst_bytes` held. A write larger than what the bucket holds is not made (the value stays in
the local cache only), so one tenant sending many long prompts nobody repeats cannot flush the
answers and blocks every other tenant shares. The buckets are kept for at most `max_tenants`
tenants (the least recently writing one is forgotten first, which only gives it a full bucket
again).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["TenantWriteBudget"]


class TenantWriteBudget:
    """Token buckets of bytes, one per tenant (see the module docstring)."""

    def __init__(
        self,
        bytes_per_s: float,
        burst_bytes: int,
        timer: Callable[[], float] = time.monotonic,
        max_tenants: int = 4096,
    ) -> None:
        if bytes_per_s <= 0 or burst_bytes <= 0:
            raise ValueError("bytes_per_s and burst_bytes must be > 0")
        self._rate = bytes_per_s
        self._burst = float(burst_bytes)
        self._timer = timer
        self._max_tenants = max_tenants
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # held, when
        self.refused = 0
        self.refused_bytes = 0

    def take(self, tenant: str, nbytes: int) -> bool:
        """Whether `tenant` may write `nbytes` now; if so, they are drawn from its bucket."""
        now = self._timer()
        held, when = self._buckets.pop(tenant, (self._burst, now))
        held = min(self._burst, held + (now - when) * self._rate)
        allowed = nbytes <= held
        if allowed:
            held -= nbytes
        else:
            self.refused += 1
            self.refused_bytes += nbytes
        self._buckets[tenant] = (held, now)
        if len(self._buckets) > self._max_tenants:
            self._buckets.popitem(last=False)
        return allowed
