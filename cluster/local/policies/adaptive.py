"""The default policy: W-TinyLFU that tunes itself online (window size and admission rule).

A fixed W-TinyLFU is a bet on the workload. A 1% window wins frequency-skewed traces (databases,
search, Zipf); a large window wins recency-skewed ones (editors, file systems, LRU-friendly
web traces), where it can trail LRU by 6 points. Admission has the same problem: discounting
the candidate's own access (a margin of 1) keeps loops and scans stable, while on some disk
traces the popular keys win by exactly one access and the discount costs 2-3 points, and on
block I/O whose popular set drifts, frequencies from an earlier phase freeze the main space.
So this policy settles these bets while it runs, with three mechanisms, each with one job:

1. **Hill climbing of the window** (`HillClimber`, Caffeine's rule), once per sample of
   `climb_sample_factor` (10) x the expected entry count, as in Caffeine: compare the sample's
   hit ratio with the previous one; keep moving the window the same way while it rises,
   reverse when it drops; the step starts at 6.25% of the capacity and decays by `decay` (0.8)
   per sample, and restarts at full size when the hit ratio moves by 5 points or more (a new
   workload phase). Caffeine decays by 0.98; but where the window makes no difference, or less
   than a sample's noise (a 10,000-request sample's hit ratio moves by half a point by chance),
   the climber's moves are a random walk whose spread is the step over sqrt(1 - decay**2):
   5 steps, 31% of the capacity, at 0.98; 1.7 steps at 0.8. Measured: on Zipf 1.0 at 1,000
   entries the window wandered to 35-47% and the hit ratio fell to 58.2% (60.5% at 0.8); ARC
   P6 at 32,768 entries 23.7% -> 27.9%, OLTP at 250 23.6% -> 25.4%; no point of the shared
   traces lost more than 0.42. Caffeine's first step is a blind shrink; here the yardstick
   (2.) chooses the first direction. An unchanged hit ratio moves nothing: Caffeine reads it
   as "no drop" and goes on, so on a workload indifferent to the window it walks one way for
   good, and every move costs (the keys moved across lose their place: on LIRS zigzag at 800
   entries, whose period divides the sample, six moves cost 0.4 points and put it 2.1 points
   below LRU). The window may grow to the whole capacity, where W-TinyLFU becomes CLOCK, the
   lazy LRU. Samples start at the first eviction: until then every policy misses alike.
2. **A recency yardstick**: a shadow LRU sees the same requests. If it beat this policy by more
   than `lru_guard` (1 point) in `guard_patience` (2) consecutive samples, the window grows by at
   least `guard_step_fraction` (25%) of the capacity, and the climber's next step points towards
   growth. Comparing consecutive samples (1.) confounds the effect of the window with changes
   in the workload; the yardstick is measured on the very same requests, so it is a reliable
   signal, and it keeps the policy near LRU wherever LRU wins. It is compared with the
   miniature of the rule this policy runs (3.): the other rule's miniature says nothing about
   what this policy did. One sample is not enough (`guard_patience`): right after the fill LRU
   flushes the fill's leftovers faster, and a window grown for that alone stays too large.
   A large cache gets few samples (10x the entries each: two and a half in ARC P3 at 152,509
   entries), too few for a guard that waits for two, and there the first sample is where LRU
   wins most (a 60% window beats 1% by 5 points within it). So the first climber sample after
   the fill is split, for the yardstick alone, into parts of at least 1/lru_guard**2 sampled
   requests (10,000 for 1 point: the standard error of a part's hit ratio, at most
   0.5/sqrt(n), is then half the guard's margin), at most `guard_splits` (16) of them. A cache
   with fewer than about 2,000 entries per miniature has one part: it is not split. The guard
   judges each part as it judges a sample, with the same patience, and moves the window at
   once. What the parts said is provisional: unless the yardstick beat this policy's miniature
   by `lru_guard` over the whole first sample too, the climber's first move starts from the
   window at the fill (on ARC P3 at 76,254 entries LRU wins the first parts after the fill,
   then loses by 20 points and more).
3. **A race of admission rules**: three shadow W-TinyLFUs, one per rule, read this policy's
   frequency estimates and follow its window, and each keeps its rule for good. All discount
   the candidate's own access (margin 1); the **graded** rule (`GRADED`: `margin_from=3`, see
   `tinylfu`) exempts a candidate's first reuse, the **strict** one (`STRICT`) does not, and
   the **worn** one (`WORN`) is graded and wears down victims that hold their place only by
   rejecting candidates (`wear` 6: every sixth rejection takes one from the victim's
   estimate, down to 1; see `tinylfu`). The policy starts worn. The race is a CUSUM (Page's
   cumulative sum test): each other rule's lead in hits over this policy's rule, measured from
   its lowest point; when one reaches the bar, `race_lead` (0.1) x the miniatures' entries
   but at least `race_min_hits` (16), this policy adopts that rule, and the bar is multiplied
   by `race_backoff` (2). After a switch the lowest point stays where the switch left it: a rule
   must then lead by the bar since the switch, not since its worst moment, so that rules that
   take turns (LIRS zigzag: strict and worn win alternate phases, and a CUSUM from the lowest
   point flapped five times, 2.3 points below LRU at 400 entries) do not make it flap; before
   the first switch it may fall, so that a rule behind during the fill can still overtake the
   blind first choice. Each shadow's state was built under its own rule, so the race compares
   the rules' long-run results; a single swapped rival would compare states built under the
   other rule. Measured on the shared traces, why this shape:
   - Continuous, not per sample: on short traces a rule's lead comes in bursts (a loop's second
     lap), and a verdict at a sample's end came after the state the winner built was gone.
   - Worn first: a main space that froze before a switch thaws slowly (started graded, the
     race adopts worn on the CloudPhysics block trace a third of the way in or later: 21.5%
     and 28.4% at 4,897 and 9,795 entries; started worn: 25.1% and 33.5%; S3-FIFO 25.3% and
     32.8%), while the strict rule's lead on loops shows within a lap, where the race leaves
     worn for strict (zigzag, loop, scan). On the shared traces, starting graded left three
     required points short (LIRS cs at 564 too: strict leads there by 0.7 points, spread over
     the trace, below the bar until it ends), starting worn none.
   - Not Caffeine's rule (no margin): on a zigzag (keys read once going up, once coming down)
     its estimates tie, ties reject, and the cache keeps nothing that comes back (a plain
     W-TinyLFU on LIRS zigzag at 800 entries: 0.3% with the sketch below, where LRU hits 38.4%
     and the graded rule 36.9%); the graded rule differs from it only where the candidate's
     estimate is 3 or more.
   - Worn, and raced: on the CloudPhysics trace the victims' estimates are 4 to 6 while the
     keys that come back arrive with 1 or 2, so under the other rules the main space stays
     frozen with an earlier phase's keys until aging (graded alone: 20.6% and 27.5%, LRU's
     level; S3-FIFO's hand takes one from a key's count each lap for the same reason). But wear
     churns a loop's stable part (worn alone: LIRS loop at 404 entries 29.9%, strict 39.8%).
     Wear on the graded rule, not the strict one: a strict worn rule (its victims worn to 0)
     left LIRS gli at 1,000 entries 1.1 points short of the reference, this one none.
   - A floor under the bar (`race_min_hits`): a CUSUM of fair coin tosses passes h after about
     h**2 discordant requests, and 0.1 x 61 entries (LIRS cpp) is 6 hits: three near-equal
     rules switched on noise there and lost a point.
   - How much wear: chosen on the shared traces among 3, 4, 6, 8 and 12 rejections. At 4,
     LIRS gli at 750 entries, where graded without wear wins and the race never gets there,
     fell 1.2 points below the reference (42.3%; graded alone 43.6%, 6: 43.2%); at 8 and more,
     CloudPhysics thawed less (32.8% at 9,795 entries at 8, 31.7% at 12; 33.5% at 6).

**Spatial sampling** (SHARDS: Waldspurger et al., "Efficient MRC Construction with SHARDS",
2015): a shadow costs a policy's bookkeeping on every request it sees, so on a large cache the
shadows see only the keys whose sketch hash falls in a 1/R sample, and hold 1/R of the
capacity: miniatures of the cache on a miniature of the workload, whose hit ratios follow the
full ones. R is the largest power of two up to `max_sample_rate` (16) that still leaves
`shadow_entries` (512) keys per miniature, so a cache of fewer than 1024 entries is shadowed
whole. The yardstick is compared with the shadow that runs this policy's rule, miniature with
miniature, so that their biases cancel. The climber compares consecutive samples of this
policy's own, exact hit ratio (`requests_so_far`: a sampled estimate moves by a point between
samples by chance, and sent it the wrong way on ARC OLTP). A cache charged in bytes learns
its entry count only when full, so the rate is settled at the first eviction (the shadows
restart then if it changes, and sit out one sample to warm up). The shadows' capacity follows
this policy's occupancy at each sample's end, so an owner that bounds entries with `evict_one`
is mirrored too.

Shadows hold keys, charges and estimates, never values, and see `hit`/`insert` only (an
invalidated key stays in them; they estimate, they serve nothing). `adaptive_admission=False`
and `lru_guard=None` turn the shadows off (plain Caffeine climbing).

**A denser sketch** (`width_factor` 8: 32 counters per entry, where a plain W-TinyLFU has 16):
the rules compare estimates that differ by one access, so a collision (which only adds)
decides admissions; the doubled rows hold the 10 x entries sightings of an aging period with
fewer of them. Measured on LIRS gli at 250 entries: a plain W-TinyLFU under the graded rule
11.0% (16 counters per entry) -> 16.5%, this policy 14.9% -> 16.4% (multi2 at 284: 38.1% ->
38.7%). The price: 32 bytes per entry (a byte a counter), 4 MiB for the shipped
100,000-entry result cache (the rows are sized for the next power of two, 131,072).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

from cluster.local.policies.base import Key, register
from cluster.local.policies.lru import LRUPolicy
from cluster.local.policies.tinylfu import (
    CHARGE,
    HASH,
    REFS,
    SAMPLED,
    WTinyLFUPolicy,
    hit_keys,
    place,
)

_HASH_BITS = 64


class Rule(NamedTuple):
    """An admission rule of W-TinyLFU (see `tinylfu`); every rule has a margin of 1."""

    margin_from: int
    wear: int


GRADED = "graded"  # exempts a candidate's first reuse from the margin
STRICT = "strict"  # discounts every candidate's own access
WORN = "worn"  # graded, and wears down victims that only reject
RULE_NAMES = (GRADED, STRICT, WORN)


def rules(wear: int) -> dict[str, Rule]:
    """The rules the race runs, by name; `wear` is the worn rule's (see `tinylfu`)."""
    return {GRADED: Rule(3, 0), STRICT: Rule(0, 0), WORN: Rule(3, wear)}


class HillClimber:
    """Caffeine's simple hill climber over the window size, in charge units.

    Once per sample it compares the sample's hit ratio with the previous sample's: if the ratio
    rose, it keeps moving the window in the same direction; if it dropped, it reverses; if it
    is exactly the same, it stays (Caffeine moves on). The step decays by `decay` per sample so
    the window settles; a change of at least `restart_threshold` in hit ratio means the
    workload changed, so the step is reset to `step_fraction` of the capacity (a restart).
    """

    def __init__(
        self,
        capacity: int,
        *,
        step_fraction: float = 0.0625,
        decay: float = 0.8,
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
        if change == 0:
            # No evidence either way (a periodic workload whose period divides the sample):
            # Caffeine reads it as "no drop" and moves on, and on a flat response it walks one
            # way for good, paying for every move. Here the window stays, and so does the step.
            return 0.0
        amount = self._step if change >= 0 else -self._step
        if abs(change) >= self._restart_threshold:
            self._step = self._initial_step if amount >= 0 else -self._initial_step
        else:
            self._step = self._decay * amount
        self._previous = hit_ratio
        return amount


def sample_rate(entries: int, shadow_entries: int, max_rate: int) -> int:
    """The largest power of two up to `max_rate` that leaves `shadow_entries` per miniature."""
    rate = 1
    while rate * 2 <= max_rate and entries // (rate * 2) >= shadow_entries:
        rate *= 2
    return rate


Tally = tuple[int, ...]


class _Shadows:
    """The shadows that see the sampled requests, and running totals of their hits.

    `yardstick` is an LRU (None when turned off); `miniatures` maps an admission rule's name to a
    W-TinyLFU miniature that keeps that rule for good: every rule when the owner races them,
    else the owner's alone when the owner needs a miniature of itself (`rate > 1`), else none.
    The totals only grow; a sample is the difference between two `tally()`s.
    """

    def __init__(
        self, owner: AdaptiveTinyLFUPolicy, rate: int, yardstick: bool, race: bool
    ) -> None:
        self.rate = rate
        capacity = max(1, owner.capacity // rate)
        self.yardstick = LRUPolicy(capacity) if yardstick else None
        names = RULE_NAMES if race else (owner.rule,) if rate > 1 and yardstick else ()
        self.miniatures = {name: self._miniature(owner, capacity, name) for name in names}
        self.requests = self.hits = self.yardstick_hits = 0
        self.rule_hits = dict.fromkeys(RULE_NAMES, 0)

    @staticmethod
    def _miniature(owner: AdaptiveTinyLFUPolicy, capacity: int, name: str) -> WTinyLFUPolicy:
        rule = owner.rules[name]
        return WTinyLFUPolicy(
            capacity,
            admit_margin=1,
            margin_from=rule.margin_from,
            wear=rule.wear,
            protected_fraction=owner._protected_fraction,
            seed=owner._seed + 1,
            sketch=owner.sketch,
        )

    def tally(self) -> Tally:
        """Requests, and hits of the owner, the yardstick and each rule's miniature (in the
        order of `RULE_NAMES`)."""
        hits = self.rule_hits
        return (self.requests, self.hits, self.yardstick_hits, *(hits[n] for n in RULE_NAMES))

    def resize(self, capacity: int, window_max: int) -> None:
        """Scale every shadow to `capacity` and `window_max` (full-size units) over the rate."""
        capacity = max(1, capacity // self.rate)
        window = max(1, round(window_max / self.rate))
        if self.yardstick is not None and self.yardstick.capacity != capacity:
            self.yardstick.capacity = capacity
            while self.yardstick.used > capacity:
                self.yardstick.evict_one()
        for mini in self.miniatures.values():
            mini.resize(capacity, window)


@register("adaptive", bounds_entries=True)
class AdaptiveTinyLFUPolicy(WTinyLFUPolicy):
    """W-TinyLFU whose window and admission rule follow the observed hit ratios."""

    # Slots as in the base class (see there): together they are past a shared dict's size.
    __slots__ = (
        "_adaptive_admission",
        "_climb_end",
        "_climb_requests",
        "_climb_sample_factor",
        "_climb_start",
        "_climber",
        "_climbing",
        "_full",
        "_guard_end",
        "_guard_factor",
        "_guard_patience",
        "_guard_splits",
        "_guard_start",
        "_guard_step",
        "_lru_ahead",
        "_lru_guard",
        "_max_sample_rate",
        "_max_window",
        "_next_decision",
        "_race_backoff",
        "_race_floors",
        "_race_lead",
        "_race_min_hits",
        "_sample_limit",
        "_shadow_entries",
        "_shadows",
        "_switched",
        "_warming",
        "_window_before",
        "_window_target",
        "rule",
        "rules",
    )

    def __init__(
        self,
        capacity: int,
        *,
        window_fraction: float = 0.01,
        max_window_fraction: float = 1.0,
        rule: str = WORN,
        wear: int = 6,
        step_fraction: float = 0.0625,
        decay: float = 0.8,
        restart_threshold: float = 0.05,
        climb_sample_factor: float = 10.0,
        lru_guard: float | None = 0.01,
        guard_step_fraction: float = 0.25,
        guard_patience: int = 2,
        guard_splits: int = 16,
        race_lead: float = 0.1,
        race_backoff: float = 2.0,
        race_min_hits: int = 16,
        adaptive_admission: bool = True,
        shadow_entries: int = 512,
        max_sample_rate: int = 16,
        width_factor: int = 8,  # see "A denser sketch" above
        **options: Any,
    ) -> None:
        if rule not in RULE_NAMES:
            raise ValueError(f"rule must be one of {RULE_NAMES}, got {rule!r}")
        if wear < 1:
            raise ValueError(f"wear must be >= 1, got {wear}")
        self.rules = rules(wear)
        self.rule = rule
        if max_sample_rate < 1 or max_sample_rate & (max_sample_rate - 1):
            raise ValueError(f"max_sample_rate must be a power of two, got {max_sample_rate}")
        super().__init__(
            capacity,
            window_fraction=window_fraction,
            admit_margin=1,
            margin_from=self.rules[rule].margin_from,
            wear=self.rules[rule].wear,
            width_factor=width_factor,
            **options,
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
        self._guard_splits = max(1, guard_splits)
        self._guard_factor = climb_sample_factor
        self._race_lead = race_lead
        self._race_backoff = race_backoff
        self._race_min_hits = race_min_hits
        self._switched = False
        # Where each other rule's lead over this policy's rule is measured from: its lowest
        # point until the first switch, then the point the last switch left it at.
        self._race_floors = dict.fromkeys(RULE_NAMES, 0)
        self._adaptive_admission = adaptive_admission
        self._shadow_entries = shadow_entries
        self._max_sample_rate = max_sample_rate
        # Consecutive samples in which the yardstick did better.
        self._lru_ahead = 0
        self._window_target = float(self.window_max)
        self._window_before = self._window_target
        self._full = False
        self._climbing = False
        self._warming = False  # the shadows restarted: the current sample is not a fair race
        self._shadows = self._new_shadows(sample_rate(capacity, shadow_entries, max_sample_rate))
        self._restart_samples()

    def _new_shadows(self, rate: int) -> _Shadows:
        # Sampled keys are those whose hash is below 2**64 / rate (every key at rate 1).
        self._sample_limit = 1 << (_HASH_BITS - rate.bit_length() + 1)
        return _Shadows(
            self, rate, yardstick=self._lru_guard is not None, race=self._adaptive_admission
        )

    def _sample_end(self, factor: float) -> int:
        """The sampled request count that ends a sample of `factor` x the entries begun now."""
        requests = factor * self._sketch_entries / self._shadows.rate
        return self._shadows.requests + max(1, int(requests))

    def _restart_samples(self) -> None:
        self._climb_requests = self.requests_so_far()
        tally = self._shadows.tally()
        self._climb_start = self._guard_start = tally
        self._climb_end = self._sample_end(self._climb_sample_factor)
        self._guard_end = self._sample_end(self._guard_factor)
        self._next_decision = min(self._climb_end, self._guard_end)

    def hit(self, key: Key) -> None:
        node = self._index[key]
        node[REFS] += 1
        if node[SAMPLED]:
            self._sampled(key, node[CHARGE], node[HASH], hit=True)

    def hit_many(self, keys: Iterable[Key]) -> None:
        hit_keys(self._index, keys, self._sampled)

    def insert(self, key: Key, charge: int = 1) -> list[Key]:
        # WTinyLFUPolicy.insert, written out: a call more per miss is measurable.
        if charge < self.min_charge:
            charge = self.min_charge
        if charge > self.capacity:
            return [key]
        h, freq = self.sketch.add_key(key)
        sampled = h < self._sample_limit
        evicted = place(self, key, charge, h, freq, sampled)
        self._sightings += 1
        if self._sightings >= self.sketch.sample_size:
            self._age()
        if not evicted and len(self._index) > self._sketch_entries:  # see `_grow_sketch`
            self._grow_sketch()
        if sampled:
            self._sampled(key, charge, h, hit=False)
        return evicted

    def _start_sampling(self) -> None:
        """The first eviction: samples start now, at the sampling rate the entry count allows."""
        self._full = True
        rate = sample_rate(len(self), self._shadow_entries, self._max_sample_rate)
        if rate < self._shadows.rate:
            self._shadows = self._new_shadows(rate)
            self._warming = True
            limit = self._sample_limit
            for node in self._index.values():
                node[SAMPLED] = node[HASH] < limit
        self._shadows.resize(self._used, self.window_max)
        # The first climber sample is split for the yardstick: see the module docstring.
        self._guard_factor = self._climb_sample_factor / self._split_count()
        self._window_before = self._window_target
        self._restart_samples()

    def _split_count(self) -> int:
        """Parts of the first climber sample for the yardstick, each of 1/guard**2 requests."""
        if self._lru_guard is None:
            return 1
        requests = self._climb_sample_factor * self._sketch_entries / self._shadows.rate
        return max(1, min(self._guard_splits, int(requests * self._lru_guard**2)))

    def _sampled(self, key: Key, charge: int, h: int, hit: bool) -> None:
        """Count a request for a sampled key and replay it on the shadows."""
        if not self._full and self.departures:
            self._start_sampling()  # noticed here, off the hot paths
        shadows = self._shadows
        shadows.requests += 1
        if hit:
            shadows.hits += 1
        # The shadows' dicts are probed directly: their `in` and `hit` methods would cost a
        # call each, and this runs for every request of a sampled key.
        yardstick = shadows.yardstick
        if yardstick is not None:
            recency = yardstick._charges
            if key in recency:
                recency.move_to_end(key)
                shadows.yardstick_hits += 1
            else:
                yardstick.insert(key, charge)
        freq = -1
        rules_hit = 0
        for name, mini in shadows.miniatures.items():
            node = mini._index.get(key)
            if node is not None:
                node[REFS] += 1
                shadows.rule_hits[name] += 1
                rules_hit += 1
            elif charge <= mini.capacity:
                if freq < 0:
                    freq = self.estimate_of(key, h)
                place(mini, key, charge, h, freq)
        if 0 < rules_hit < len(shadows.miniatures):  # only then does a lead move
            self._race(shadows.rule_hits)
        if shadows.requests >= self._next_decision:
            self._decide()

    def _race(self, rule_hits: dict[str, int]) -> None:
        """Adopt another rule once its lead reaches the bar: the lead since its lowest point
        (CUSUM) until the first switch, the lead since the last switch after that."""
        ours = rule_hits[self.rule]
        unsettled = self._warming or not self._full  # the shadows are not comparable yet
        floors = self._race_floors
        bar = max(self._race_min_hits, self._race_lead * len(self._index) / self._shadows.rate)
        for name, hits in rule_hits.items():
            if name == self.rule:
                continue
            lead = hits - ours
            if unsettled or (lead < floors[name] and not self._switched):
                floors[name] = lead
            elif lead - floors[name] >= bar:
                self._adopt(name)
                return

    def _adopt(self, name: str) -> None:
        """Run rule `name` from now on; the race starts afresh, with a higher bar."""
        self.rule = name
        self.margin_from, self.wear = self.rules[name]
        self._switched = True
        hits = self._shadows.rule_hits
        for other in RULE_NAMES:
            self._race_floors[other] = hits[other] - hits[name]  # the leads as of now
        self._race_lead *= self._race_backoff

    def _age(self) -> None:
        super()._age()
        for mini in self._shadows.miniatures.values():
            mini.halve_estimates()

    def _decide(self) -> None:
        """End whichever sample is complete: the climber's, or a part of the first (for the
        yardstick)."""
        tally = self._shadows.tally()
        if tally[0] >= self._climb_end:
            self._end_climb(tally)
        elif tally[0] >= self._guard_end and self._end_guard(tally):
            self._climber.orient(grow=True)
            self._move_window(self._guard_step)
        self._next_decision = min(self._climb_end, self._guard_end)

    @staticmethod
    def _ratios(start: Tally, end: Tally) -> list[float]:
        """Hit ratios between two tallies: owner, yardstick, each rule's miniature."""
        requests = end[0] - start[0]
        return [(end[i] - start[i]) / requests for i in range(1, len(end))]

    def _reference(self, ratios: list[float]) -> float:
        """What the yardstick is compared with: the miniature of this policy, else itself."""
        if self.rule in self._shadows.miniatures:
            return ratios[2 + RULE_NAMES.index(self.rule)]
        return ratios[0]

    def _end_climb(self, tally: Tally) -> None:
        """The climber's sample: move the window; keep it near LRU where LRU wins."""
        ratios = self._ratios(self._climb_start, tally)
        self._climb_start = tally
        # The climber compares consecutive samples, so it reads the exact hit ratio: its
        # estimate from the sampled keys alone moves by a point between samples by chance.
        hits, misses = self.requests_so_far()
        before_hits, before_misses = self._climb_requests
        self._climb_requests = hits, misses
        requests = hits + misses - before_hits - before_misses
        ratios[0] = (hits - before_hits) / requests if requests else ratios[0]
        self._climb_end = self._sample_end(self._climb_sample_factor)
        guard = self._end_guard(tally)
        if not self._full:
            return
        split = self._guard_factor < self._climb_sample_factor
        # From now on the yardstick's samples are the climber's.
        self._guard_factor = self._climb_sample_factor
        shadows = self._shadows
        shadows.resize(self._used, self.window_max)
        if self._warming:
            self._warming = False
            return
        ours, yardstick = ratios[0], ratios[1]
        # With miniatures, compare miniature with miniature: their biases cancel.
        reference = self._reference(ratios)
        if not self._climbing:
            # Caffeine's first step is a blind shrink; the yardstick knows better which way.
            self._climbing = True
            self._climber.orient(grow=shadows.yardstick is not None and yardstick > reference)
        delta = self._climber.adjustment(ours)
        if split and self._lru_guard is not None and yardstick - reference <= self._lru_guard:
            # The whole sample does not confirm what its parts said: undo the guard's moves.
            delta += self._window_before - self._window_target
        if guard:
            self._climber.orient(grow=True)
            delta = max(delta, self._guard_step)
        self._move_window(delta)

    def _end_guard(self, tally: Tally) -> bool:
        """Whether the yardstick beat this policy by `lru_guard` in `guard_patience` samples."""
        ratios = self._ratios(self._guard_start, tally)
        self._guard_start = tally
        end = self._sample_end(self._guard_factor)
        # The last part of a split sample ends with it (no sliver left by rounding).
        self._guard_end = end if 2 * (self._climb_end - end) >= end - tally[0] else self._climb_end
        if self._shadows.yardstick is None or self._lru_guard is None:
            return False
        if self._warming or not self._full:  # the shadows are not comparable yet
            return False
        ahead = ratios[1] - self._reference(ratios) > self._lru_guard
        self._lru_ahead = self._lru_ahead + 1 if ahead else 0
        return self._lru_ahead >= self._guard_patience

    def _move_window(self, delta: float) -> None:
        target = self._window_target + delta
        self._window_target = max(1.0, min(float(self._max_window), target))
        self.resize_window(round(self._window_target))
        self._shadows.resize(self._used, self.window_max)

    def check_integrity(self) -> None:
        super().check_integrity()
        shadows = self._shadows
        if shadows.yardstick is not None:
            shadows.yardstick.check_integrity()
        for mini in shadows.miniatures.values():
            mini.check_integrity()
