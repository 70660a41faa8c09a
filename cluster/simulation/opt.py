"""Belady's OPT: the clairvoyant upper bound on the hit ratio of any cache of unit-size objects.

On a miss with a full cache, OPT drops whichever of the resident keys and the newcomer is
requested again farthest in the future (a newcomer that is needed later than every resident key
is not cached at all: caching is optional, so this is the true optimum).

Cost: `next_uses` sorts once per trace (numpy); each replay is one pass with a max-heap of the
residents' next-use positions. Next-use positions are unique per request, which allows two
shortcuts: the heap holds bare ints (the key at a position is `keys[position]`), and a heap entry
is stale exactly when its position has already been passed, so stale entries always sit below
live ones and are purged in bulk, never checked one by one.
"""

from __future__ import annotations

import heapq
from array import array

import numpy as np

from cluster.simulation.traces import CHUNK


def next_uses(keys: np.ndarray) -> np.ndarray:
    """For each request i, the position of the next request of the same key.

    A key never requested again gets `len(keys) + i`: beyond every real position, unique, and
    still pointing back to its key (at `position - len(keys)`).
    """
    n = len(keys)
    positions = np.arange(n, dtype=np.int64)
    following = n + positions
    if n > 1:
        order = np.argsort(keys, kind="stable")
        same = keys[order[1:]] == keys[order[:-1]]
        following[order[:-1][same]] = order[1:][same]
    return following


def opt_hits(keys: np.ndarray, capacity: int, following: np.ndarray | None = None) -> int:
    """Hits of Belady's OPT with room for `capacity` unit-size keys over `keys`."""
    if following is None:
        following = next_uses(keys)
    n = len(keys)
    if capacity <= 0 or n == 0:
        return 0
    by_position = array("q", keys.tobytes())
    resident: set[int] = set()
    heap: list[int] = []  # negated next-use positions of resident keys (+ stale ones)
    hits = 0
    limit = 2 * capacity + 1024
    for begin in range(0, n, CHUNK):
        chunk_keys = keys[begin : begin + CHUNK].tolist()
        chunk_next = following[begin : begin + CHUNK].tolist()
        for offset, key in enumerate(chunk_keys):
            upcoming = chunk_next[offset]
            if key in resident:
                hits += 1
                heapq.heappush(heap, -upcoming)
                continue
            if len(resident) >= capacity:
                farthest = -heap[0]
                if farthest < upcoming:
                    continue  # the newcomer is needed last of all: do not cache it
                heapq.heappop(heap)
                resident.discard(by_position[farthest if farthest < n else farthest - n])
            resident.add(key)
            heapq.heappush(heap, -upcoming)
            if len(heap) > limit:
                now = begin + offset
                heap = [entry for entry in heap if -entry > now]
                heapq.heapify(heap)
    return hits
