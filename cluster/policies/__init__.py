"""Eviction and admission policies behind one contract (`base.EvictionPolicy`).

Importing this package registers every policy; `make_policy(name, capacity)` builds one.
"""

from cluster.policies import lru  # noqa: F401  (registers)
from cluster.policies.base import EvictionPolicy, Key, make_policy, policy_names, register

DEFAULT_POLICY = "lru"

__all__ = ["DEFAULT_POLICY", "EvictionPolicy", "Key", "make_policy", "policy_names", "register"]
