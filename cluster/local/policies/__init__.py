"""Eviction and admission policies behind one contract (`base.EvictionPolicy`).

Importing this package registers every policy; `make_policy(name, capacity)` builds one.

| name       | module      | idea                                                         |
|------------|-------------|--------------------------------------------------------------|
| `lru`      | lru.py      | least recently used                                          |
| `lfu`      | lfu.py      | least frequently used, O(1), LRU among equals                |
| `tinylfu`  | tinylfu.py  | W-TinyLFU: LRU window + sketch admission + SLRU main space   |
| `adaptive` | adaptive.py | W-TinyLFU that follows the best of sampled simulations: the  |
|            |             | default                                                      |
| `s3fifo`   | s3fifo.py   | small/main/ghost FIFOs (S3-FIFO)                             |
| `sieve`    | sieve.py    | FIFO with visited bits and a moving hand (SIEVE)             |
| `arc`      | arc.py      | Adaptive Replacement Cache                                   |
"""

from cluster.local.policies import adaptive, arc, lfu, lru, s3fifo, sieve, tinylfu  # noqa: F401
from cluster.local.policies.base import (
    EvictionPolicy,
    Key,
    bounds_entries,
    make_policy,
    policy_names,
    register,
)

DEFAULT_POLICY = "adaptive"

__all__ = [
    "DEFAULT_POLICY",
    "EvictionPolicy",
    "Key",
    "bounds_entries",
    "make_policy",
    "policy_names",
    "register",
]
