"""The default policy: W-TinyLFU that tunes itself online (window size and admission margin).

A fixed W-TinyLFU is a bet on the workload. A 1% window wins frequency-skewed traces (databases,
search, Zipf); a large window wins recency-skewed ones (editors, file systems, LRU-friendly
web traces), where it can trail LRU by 6 points. Admission has the same problem: discounting
the candidate's own access (`admit_margin=1`) keeps loops and scans stable, while on some disk
traces the popular keys win by exactly one access and the discount costs 2-3 points. So this
policy settles both bets while it runs. Three mechanisms, each with one job, all evaluated once
per sample of `climb_sample_factor` (10) x the expected entry count, as in Caffeine:

1. **Hill climbing of the window** (`HillClimber`, Caffeine's rule): compare the sample's hit
   ratio with the previous one; keep moving the window the same way while it does not drop,
   reverse when it drops; the step starts at 6.25% of the capacity and decays by 0.98 per
   sample, and restarts at full size when the hit ratio moves by 5 points or more (a new
   workload phase). Caffeine's first step is a blind shrink; here the yardstick (2.) chooses
   the first direction. The window may grow to the whole capacity, where W-TinyLFU becomes
   exactly LRU. Samples start at the first eviction: until then every policy misses alike.
2. **A recency yardstick**: a shadow LRU of the same capacity sees the same requests. If it beat
   this policy by more than `lru_guard` (1 point) in `guard_patience` (2) consecutive samples,
   the window grows by at least `guard_step_fraction` (25%) of the capacity. Comparing
   consecutive samples (1.) confounds the effect of the window with changes in the workload;
   the yardstick is measured on the very same requests, so it is a reliable signal, and it
   keeps the policy near LRU wherever LRU wins. One sample is not enough: right after the fill
   LRU flushes the fill's leftovers faster, and a window grown for that stays too large (3
   points on ARC P3).
3. **A rival admission rule**: a shadow W-TinyLFU with the other `admit_margin` (0 or 1) shares
   this policy's sketch and window; when it beat this policy over a sample (`rival_patience`),
   the two swap rules. Starting from 1 is the better bet on short traces (loops, scans).

Shadows hold keys and charges, never values, and see `hit`/`insert` only (an invalidated key
stays in them; they estimate, they serve nothing). The price is two more key directories and
about 2.5x the CPU of a fixed W-TinyLFU per access (about 6 us instead of 2.5 us in CPython).
`adaptive_admission=False` and `lru_guard=None` turn the shadows off (plain Caffeine climbing).
"""

from __future__ import annotations

from typing import Any

from cluster.policies.base import Key, register
from cluster.policies.lru import LRUPolicy
from cluster.policies.tinylfu import WTinyLFUPolicy


class HillClimber:
    """Caffeine's simple hill climber over the window size, in charge units.

    Once per sample it compares the sample's hit ratio with the previous sample's: if the ratio
    did not drop, it keeps moving the window in the same direction; if it dropped, it reverses.
    The step decays by `decay` per sample so the window settles; a change of at least
    `restart_threshold` in hit ratio means the workload changed, so the step is reset to
    `step_fraction` of the capacity (a restart).
    """

    def __init__(
        self,
        capacity: int,
        *,
        step_fraction: float = 0.0625,
        decay: float = 0.98,
        restart_threshold: float = 0.05,
    ) -> None:
        self._initial_step = step_fraction * capacity
        self._decay = decay
        self._restart_threshold = restart_threshold
        self._step = -self._initial_step
        self._previous = 0.0

    def orient(self, grow: bool) -> None:
        """Point the pending step towards growth (or shrinkage) of the window."""
        self._step = abs(self._step) if grow else -abs(self._step)

    @property
    def step(self) -> float:
        """The signed size of the next move if the hit ratio does not drop."""
        return self._step

    def adjustment(self, hit_ratio: float) -> float:
        """The signed change of window size after a sample with `hit_ratio` (0..1)."""
        change = hit_ratio - self._previous
        amount = self._step if change >= 0 else -self._step
        if abs(change) >= self._restart_threshold:
            self._step = self._initial_step if amount >= 0 else -self._initial_step
        else:
            self._step = self._decay * amount
        self._previous = hit_ratio
        return amount


@register("adaptive")
class AdaptiveTinyLFUPolicy(WTinyLFUPolicy):
    """W-TinyLFU whose window and admission margin follow the observed hit ratios."""

    def __init__(
        self,
        capacity: int,
        *,
        window_fraction: float = 0.01,
        max_window_fraction: float = 1.0,
        admit_margin: int = 1,
        step_fraction: float = 0.0625,
        decay: float = 0.98,
        restart_threshold: float = 0.05,
        climb_sample_factor: float = 10.0,
        lru_guard: float | None = 0.01,
        guard_step_fraction: float = 0.25,
        guard_patience: int = 2,
        rival_patience: int = 1,
        adaptive_admission: bool = True,
        **options: Any,
    ) -> None:
        if admit_margin not in (0, 1):
            raise ValueError(f"admit_margin must be 0 or 1, got {admit_margin}")
        super().__init__(
            capacity, window_fraction=window_fraction, admit_margin=admit_margin, **options
        )
        self._max_window = max(1, round(max_window_fraction * capacity))
        self._climber = HillClimber(
            capacity,
            step_fraction=step_fraction,
            decay=decay,
            restart_threshold=restart_threshold,
        )
        self._climb_sample_factor = climb_sample_factor
        self._lru_guard = lru_guard
        self._guard_step = guard_step_fraction * capacity
        self._guard_patience = guard_patience
        self._rival_patience = rival_patience
        # Consecutive samples in which the yardstick / the rival did better than this policy.
        self._lru_ahead = 0
        self._rival_ahead = 0
        self._window_target = float(self.window_max)
        self._yardstick = LRUPolicy(capacity) if lru_guard is not None else None
        self._rival: WTinyLFUPolicy | None = None
        if adaptive_admission:
            self._rival = WTinyLFUPolicy(
                capacity,
                window_fraction=window_fraction,
                admit_margin=1 - admit_margin,
                sketch=self.sketch,
                protected_fraction=options.get("protected_fraction", 0.8),
                seed=options.get("seed", 0) + 1,
            )
        self._full = False
        self._climbing = False
        self._requests = self._hits = self._yardstick_hits = self._rival_hits = 0
        self._sample_size = self._next_sample_size()

    def _next_sample_size(self) -> int:
        return max(1, int(self._climb_sample_factor * self._sketch_entries))

    def hit(self, key: Key) -> None:
        self.sketch.increment(key)
        self._touch(key)
        self._hits += 1
        self._shadow(key, 0)

    def insert(self, key: Key, charge: int = 1) -> list[Key]:
        if charge > self.capacity:
            return [key]
        self.sketch.increment(key)
        evicted = self._place(key, charge)
        if evicted and not self._full:
            # Until the first eviction every policy misses alike: start the first sample now.
            self._full = True
            self._requests = self._hits = self._yardstick_hits = self._rival_hits = 0
        self._shadow(key, charge)
        return evicted

    def _shadow(self, key: Key, charge: int) -> None:
        """Replay the access on the shadows (`charge` 0: a hit here, look the charge up)."""
        # Membership is tested on the shadows' dicts directly: a Python-level __contains__ call
        # costs as much again as the probes themselves, on every access.
        yardstick = self._yardstick
        if yardstick is not None:
            if key in yardstick._charges:
                yardstick.hit(key)
                self._yardstick_hits += 1
            else:
                yardstick.insert(key, charge or self.charge_of(key))
        rival = self._rival
        if rival is not None:
            if key in rival._window or key in rival._probation or key in rival._protected:
                rival._touch(key)
                self._rival_hits += 1
            else:
                rival._place(key, charge or self.charge_of(key))
        self._requests += 1
        if self._requests >= self._sample_size:
            self._end_sample()

    def _end_sample(self) -> None:
        requests = self._requests
        ours = self._hits / requests
        yardstick = self._yardstick_hits / requests
        rival = self._rival_hits / requests
        self._requests = self._hits = self._yardstick_hits = self._rival_hits = 0
        self._sample_size = self._next_sample_size()
        if not self._full:
            return
        if self._rival is not None:
            self._rival_ahead = self._rival_ahead + 1 if rival > ours else 0
            if self._rival_ahead >= self._rival_patience:
                self._rival_ahead = 0
                self.admit_margin, self._rival.admit_margin = (
                    self._rival.admit_margin,
                    self.admit_margin,
                )
        if not self._climbing:
            # Caffeine's first step is a blind shrink; the yardstick knows better which way.
            self._climbing = True
            self._climber.orient(grow=yardstick > ours)
        delta = self._climber.adjustment(ours)
        if self._lru_guard is not None:
            self._lru_ahead = self._lru_ahead + 1 if yardstick - ours > self._lru_guard else 0
            if self._lru_ahead >= self._guard_patience:
                delta = max(delta, self._guard_step)
        self._move_window(delta)

    def _move_window(self, delta: float) -> None:
        target = self._window_target + delta
        self._window_target = max(1.0, min(float(self._max_window), target))
        self.resize_window(round(self._window_target))
        if self._rival is not None:
            self._rival.resize_window(self.window_max)

    def check_integrity(self) -> None:
        super().check_integrity()
        for shadow in (self._yardstick, self._rival):
            if shadow is not None:
                shadow.check_integrity()
