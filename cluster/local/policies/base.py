"""The contract every eviction policy keeps, and the registry that names them.

A policy decides which keys stay resident under a capacity; it holds no values. The cache that
owns a policy stores values beside it and drops the value of every key the policy evicts. Sizes
are "charges" in whatever unit the owner chose (bytes for the result cache, 1 per object in the
simulator); `capacity` is in the same unit.

The protocol is the whole conversation:

    if key in policy:  policy.hit(key)                      # a hit
    else:              evicted = policy.insert(key, charge)  # a miss, offered for admission

`insert` may decline the newcomer (admission policies such as W-TinyLFU do): the newcomer is
then among the keys it returns, so the owner must check `key in policy` before storing a value.

An owner may also bound the number of resident keys (the result cache bounds bytes and
entries). A policy registered with `bounds_entries=True` takes that bound as `max_entries` and
keeps it itself, so that the bound that binds goes through its admission decision (a W-TinyLFU
told of the bound only by `evict_one` calls after the fact admits every candidate and loses its
scan resistance). For every other policy the owner keeps the bound with `evict_one`, which is
the order those policies evict in anyway; `make_policy` drops `max_entries` for them.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Protocol, runtime_checkable

Key = Hashable


@runtime_checkable
class EvictionPolicy(Protocol):
    """Residency of keys within `capacity` charge units."""

    capacity: int

    def __contains__(self, key: object) -> bool:
        """Whether `key` is resident. Changes nothing."""
        ...

    def __len__(self) -> int:
        """Number of resident keys."""
        ...

    @property
    def used(self) -> int:
        """Sum of the charges of resident keys; never above `capacity` after a call returns."""
        ...

    def hit(self, key: Key) -> None:
        """Record an access to resident `key`. The caller guarantees `key in self`."""
        ...

    def insert(self, key: Key, charge: int = 1) -> list[Key]:
        """Record a miss on non-resident `key` and offer it for admission.

        Returns every key that is no longer resident because of this call, in eviction order;
        `key` itself is among them when it was not admitted (declined, or `charge` exceeds
        `capacity`). The caller guarantees `key not in self` and `charge >= 1`.
        """
        ...

    def remove(self, key: Key) -> None:
        """Forget `key` (invalidated or expired); no-op when it is not resident."""
        ...

    def evict_one(self) -> Key | None:
        """Evict the key this policy would evict next and return it; None when empty.

        For owners that enforce a bound the policy does not know (an entry count).
        """
        ...

    def check_integrity(self) -> None:
        """Raise AssertionError when internal bookkeeping is inconsistent (tests call this)."""
        ...


class ChargedPolicy:
    """What the classic policies share: the resident keys' charges and their sum, the
    oversized-newcomer rule, and an `insert` that evicts until the newcomer fits.

    A subclass keeps its own order and provides `_evict` (pick a victim, drop it from that
    order, return it), `_admit` (put a newcomer into that order) and `_forget` (drop a removed
    key from it); it never touches `_charges` or `_used` itself.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._charges: dict[Key, int] = {}
        self._used = 0

    def __contains__(self, key: object) -> bool:
        return key in self._charges

    def __len__(self) -> int:
        return len(self._charges)

    @property
    def used(self) -> int:
        return self._used

    def insert(self, key: Key, charge: int = 1) -> list[Key]:
        if charge > self.capacity:
            return [key]
        evicted = []
        while self._used + charge > self.capacity:
            evicted.append(self._pop_victim())
        self._admit(key, charge)
        self._charges[key] = charge
        self._used += charge
        return evicted

    def remove(self, key: Key) -> None:
        charge = self._charges.pop(key, None)
        if charge is not None:
            self._used -= charge
            self._forget(key)

    def evict_one(self) -> Key | None:
        return self._pop_victim() if self._charges else None

    def _pop_victim(self) -> Key:
        victim = self._evict()
        self._used -= self._charges.pop(victim)
        return victim

    def _evict(self) -> Key:
        raise NotImplementedError

    def _admit(self, key: Key, charge: int) -> None:
        raise NotImplementedError

    def _forget(self, key: Key) -> None:
        raise NotImplementedError

    def check_integrity(self) -> None:
        assert self._used == sum(self._charges.values()), "used != sum of charges"
        assert self._used <= self.capacity, "over capacity"


PolicyFactory = Callable[..., EvictionPolicy]

_REGISTRY: dict[str, PolicyFactory] = {}
_BOUNDS_ENTRIES: set[str] = set()


def register(
    name: str, *, bounds_entries: bool = False
) -> Callable[[PolicyFactory], PolicyFactory]:
    """Class decorator: make a policy constructible by `name` in `make_policy`.

    `bounds_entries`: the factory takes `max_entries` and keeps that bound itself.
    """

    def decorate(factory: PolicyFactory) -> PolicyFactory:
        if name in _REGISTRY:
            raise ValueError(f"policy {name!r} registered twice")
        _REGISTRY[name] = factory
        if bounds_entries:
            _BOUNDS_ENTRIES.add(name)
        return factory

    return decorate


def policy_names() -> list[str]:
    """Names `make_policy` accepts."""
    return sorted(_REGISTRY)


def bounds_entries(name: str) -> bool:
    """Whether policy `name` keeps an owner's entry bound itself (see the module docstring)."""
    return name in _BOUNDS_ENTRIES


def make_policy(
    name: str, capacity: int, *, max_entries: int | None = None, **options: Any
) -> EvictionPolicy:
    """A new, empty policy `name` with `capacity` charge units; ValueError for an unknown name.

    `max_entries` reaches only a policy that bounds entries itself; for the others the owner
    keeps that bound with `evict_one`.
    """
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    if max_entries is not None and max_entries < 0:
        raise ValueError(f"max_entries must be >= 0, got {max_entries}")
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {policy_names()}") from None
    if max_entries is not None and name in _BOUNDS_ENTRIES:
        options["max_entries"] = max_entries
    return factory(capacity, **options)
