"""The default policy: a W-TinyLFU that copies its window size and admission rule from the best
of a few small simulations of itself and of ARC that run beside it, and runs as ARC when ARC
is the best.

No fixed W-TinyLFU suits every workload. A 1% window with strict admission wins where
popularity is stable or keys loop; a window as large as the cache (CLOCK, close to LRU) wins
where the keys that come back are the recent ones, as in chat sessions that are abandoned
after a few turns; a main space whose victims stay only by outscoring newcomers wants their
estimates lowered where popularity drifts; and where popular keys keep changing but each stays
popular for a while (a drifting ranking, disk traces such as ARC's P3), ARC's balance of a
recency list and a frequency list, moved by ghost hits, beats every W-TinyLFU. So the policy
simulates each configuration of `CONFIGS` on the same requests and runs whichever has recently
scored the most hits:

- **Sampled simulations** (SHARDS, Waldspurger et al. 2015): a simulation sees only the keys
  whose hash falls in a 1/R slice and has 1/R of the capacity, which keeps its hit ratio close
  to that of the full cache at 1/R of the cost. R is the largest power of two up to
  `max_sample_rate` that leaves each simulation `min_sample_entries` entries, so small caches
  are simulated whole. Simulations hold keys and estimates, never values.
- **Scores start after the fill**: until every simulation is full they all hit alike, and just
  after it the large windows flush the fill's leftovers fastest, so for `warmup` x the
  simulations' entries more requests only a lead of `warmup_margin` times the usual margin
  switches (a cache that must leave its first configuration at once still can), and then the
  scores start afresh but for deficits: a configuration that fell behind the one in use even
  while the fill favoured it starts that far behind, so a short burst right after the warm-up
  does not switch to it against what the warm-up showed.
- **Recent scores**: hits are halved every `decay_factor` x the simulations' entries requests,
  so the choice follows a workload that changes.
- **Switch on a clear lead only**: a switch costs hits while the contents catch up with the
  new configuration, so the leader must be ahead of the configuration in use by
  `switch_margin` of the recent requests plus `noise` standard deviations of chance
  (sqrt(requests)); each switch multiplies the margin by `backoff` and each decay period
  takes it back by `recovery`, so that configurations that win alternate phases of a periodic
  workload do not make the policy flap.
- **A switch to or from ARC needs `arc_margin` times that margin**: it keeps every resident
  and its standing (seen once or more, how recently), so the contents catch up sooner than
  after a move of the window, and ARC's lead where it wins (2 to 3 points) is about the usual
  margin, which would otherwise keep the policy from ever following it.
- **A switch of admission rule alone is cheap**: between configurations with the same window
  nothing moves and the contents need not catch up, so the leader needs only a lead over
  chance (`rule_noise` standard deviations, no margin, in the warm-up too) and the margin does
  not grow; otherwise a lead built up in an earlier phase keeps the worse rule long after the
  other has overtaken.
  Chance is judged by the requests on which the two simulations disagree (one hit, the other
  missed), the only ones that move the lead: two rules that agree on most requests differ
  by chance far less than sqrt(requests), and a real lead shows within a short trace.
- **A switch between W-TinyLFUs** moves the window boundary (keys change segment, nothing is
  evicted) and sets the admission rule.
- **A switch to ARC** moves the residents into an `ARCPolicy` of the same capacity, coldest
  first (probation, protected, then the window): keys seen more than once to T2, the others
  to T1, with T1's target scaled from the ARC simulation's. While ARC runs, this W-TinyLFU
  holds no key, but its sketch still counts the misses. **A switch back** moves ARC's
  residents into the W-TinyLFU, T1 before T2 (coldest first): the youngest fill the window,
  the youngest of T2 the protected segment, the rest probation. Neither evicts anything.
- **Entry bound**: both structures charge each key at least `capacity / max_entries`
  (`tinylfu`'s minimum charge), so the capacity bounds the entries too, whichever runs.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any, NamedTuple

from cluster.local.policies.arc import ARCPolicy
from cluster.local.policies.base import Key, register
from cluster.local.policies.tinylfu import (
    CHARGE,
    FREQ,
    HASH,
    KEY,
    REFS,
    SAMPLED,
    WTinyLFUPolicy,
)


class Config(NamedTuple):
    """One W-TinyLFU configuration (see `tinylfu` for the admission rule's fields), or ARC
    (`arc=True`, the other fields unused)."""

    window_fraction: float
    margin_from: int
    lower_every: int
    arc: bool = False

    def options(self) -> dict[str, Any]:
        """The `WTinyLFUPolicy` options of this configuration (every one has a margin of 1)."""
        return {
            "window_fraction": self.window_fraction,
            "admit_margin": 1,
            "margin_from": self.margin_from,
            "lower_every": self.lower_every,
        }


CONFIGS = (
    Config(0.01, 0, 0),  # strict: loops and scans keep a stable part
    Config(0.01, 3, 6),  # a first reuse gets in, and victims that only reject are lowered
    Config(0.2, 3, 2),  # a larger window, victims lowered faster, for popularity that drifts
    Config(1.0, 3, 0),  # all window: CLOCK, no admission, for recency
    Config(0.0, 0, 0, arc=True),  # ARC: a balance of recency and frequency that it adapts
)

# The sketch hash bits that pick the sample: bits the sketch's counter indexes do not use.
_SAMPLE_SHIFT = 28
# The smallest lead in hits that may switch, whatever the request count.
_MIN_LEAD = 8


def sample_rate(entries: int, min_entries: int, max_rate: int) -> int:
    """The largest power of two up to `max_rate` that leaves `min_entries` per simulation."""
    rate = 1
    while rate * 2 <= max_rate and entries // (rate * 2) >= min_entries:
        rate *= 2
    return rate


def _same_structure(a: Config, b: Config) -> bool:
    """Whether switching between `a` and `b` moves no key: the same W-TinyLFU window."""
    return not a.arc and not b.arc and a.window_fraction == b.window_fraction


@register("adaptive", bounds_entries=True)
class AdaptiveTinyLFUPolicy(WTinyLFUPolicy):
    """W-TinyLFU whose configuration follows the best of its sampled simulations; while the
    ARC configuration runs, an `ARCPolicy` holds the resident keys and this W-TinyLFU is empty
    but for its frequency sketch."""

    __slots__ = (
        "_arc",
        "_arc_margin",
        "_backoff",
        "_configs",
        "_decay_after",
        "_disagreements",
        "_hashes",
        "_margin",
        "_noise",
        "_recovery",
        "_requests",
        "_rule_noise",
        "_rule_pairs",
        "_sample_mask",
        "_scores",
        "_seen",
        "_simulations",
        "_switch_margin",
        "_warm_start",
        "_warming",
        "_warmup",
        "_warmup_margin",
        "config",
    )

    def __init__(
        self,
        capacity: int,
        *,
        configs: tuple[Config, ...] = CONFIGS,
        initial: int = 1,
        min_sample_entries: int = 2048,
        max_sample_rate: int = 64,
        decay_factor: float = 10.0,
        switch_margin: float = 0.02,
        backoff: float = 2.0,
        noise: float = 1.0,
        rule_noise: float = 2.0,
        recovery: float = 0.9,
        warmup: float = 1.0,
        warmup_margin: float = 5.0,
        arc_margin: float = 0.5,
        width_factor: int = 8,
        max_entries: int | None = None,
        **options: Any,
    ) -> None:
        if not 0 <= initial < len(configs) or configs[initial].arc:
            raise ValueError(f"initial must index a W-TinyLFU configuration, got {initial}")
        if max_sample_rate < 1 or max_sample_rate & (max_sample_rate - 1):
            raise ValueError(f"max_sample_rate must be a power of two, got {max_sample_rate}")
        options["width_factor"] = width_factor
        super().__init__(capacity, max_entries=max_entries, **configs[initial].options(), **options)
        rate = sample_rate(capacity // self.min_charge, min_sample_entries, max_sample_rate)
        self._sample_mask = rate - 1
        small = max(1, capacity // rate)
        entries = None if max_entries is None else max(1, max_entries // rate)
        self._simulations: list[WTinyLFUPolicy | ARCPolicy] = [
            ARCPolicy(small)
            if config.arc
            else WTinyLFUPolicy(small, max_entries=entries, **config.options(), **options)
            for config in configs
        ]
        # While ARC runs: it holds the residents, and each one's sketch hash is kept here.
        self._arc: ARCPolicy | None = None
        self._hashes: dict[Key, int] = {}
        self.config = initial
        self._configs = configs
        self._scores = [0.0] * len(configs)
        # Per pair of configurations with the same window: the requests one hit, the other not.
        self._rule_pairs = [
            (i, j)
            for i, j in itertools.combinations(range(len(configs)), 2)
            if _same_structure(configs[i], configs[j])
        ]
        self._disagreements = dict.fromkeys(self._rule_pairs, 0.0)
        self._requests = 0.0
        self._switch_margin = self._margin = switch_margin
        self._backoff = backoff
        self._noise = noise
        self._rule_noise = rule_noise
        self._recovery = recovery
        self._warming = True
        self._warm_start: int | None = None
        self._seen = 0
        small_entries = max(1, small // self.min_charge)
        self._warmup = warmup * small_entries
        self._warmup_margin = warmup_margin
        self._arc_margin = arc_margin
        self._decay_after = decay_factor * small_entries

    def _is_sampled(self, h: int) -> bool:
        return not (h >> _SAMPLE_SHIFT) & self._sample_mask

    def __contains__(self, key: object) -> bool:
        arc = self._arc
        return key in self._index if arc is None else key in arc

    def __len__(self) -> int:
        arc = self._arc
        return len(self._index) if arc is None else len(arc)

    @property
    def used(self) -> int:
        arc = self._arc
        return self._used if arc is None else arc.used

    def hit(self, key: Key) -> None:
        arc = self._arc
        if arc is None:
            node = self._index[key]
            node[REFS] += 1
            if node[SAMPLED]:
                self._simulate(key, node[CHARGE], node[HASH])
            return
        arc.hit(key)
        h = self._hashes[key]
        if self._is_sampled(h):
            self._simulate(key, arc._charges[key], h)

    def hit_many(self, keys: Iterable[Key]) -> None:
        keys = iter(keys)
        if self._arc is None:
            index = self._index
            for key in keys:
                node = index.get(key)
                if node is not None:
                    node[REFS] += 1
                    if node[SAMPLED]:
                        self._simulate(key, node[CHARGE], node[HASH])
                        if self._arc is not None:
                            break  # switched to ARC: the rest go through `hit`
        for key in keys:
            if key in self:
                self.hit(key)

    def insert(self, key: Key, charge: int = 1) -> list[Key]:
        if charge < self.min_charge:
            charge = self.min_charge
        if charge > self.capacity:
            return [key]
        h = self.sketch.hash(key)
        sampled = self._is_sampled(h)
        arc = self._arc
        if arc is None:
            evicted = self.insert_hashed(key, charge, h, sampled)
        else:
            # ARC decides; the sketch still counts misses, for a switch back to W-TinyLFU.
            self.sketch.add(h)
            self._sightings += 1
            if self._sightings >= self.sketch.sample_size:
                self._age()
            evicted = arc.insert(key, charge)
            hashes = self._hashes
            for gone in evicted:
                del hashes[gone]
            hashes[key] = h
        if sampled:
            self._simulate(key, charge, h)
        return evicted

    def remove(self, key: Key) -> None:
        arc = self._arc
        if arc is None:
            super().remove(key)
        elif self._hashes.pop(key, None) is not None:
            arc.remove(key)

    def evict_one(self) -> Key | None:
        arc = self._arc
        if arc is None:
            return super().evict_one()
        key = arc.evict_one()
        if key is not None:
            del self._hashes[key]
        return key

    def _simulate(self, key: Key, charge: int, h: int) -> None:
        """Replay a request of a sampled key on every simulation; switch when one leads."""
        scores = self._scores
        configs = self._configs
        hits = 0  # bit i: simulation i hit
        for i, simulation in enumerate(self._simulations):
            if isinstance(simulation, ARCPolicy):
                if key in simulation:
                    simulation.hit(key)
                    scores[i] += 1.0
                    hits |= 1 << i
                elif charge <= simulation.capacity:
                    simulation.insert(key, charge)
                continue
            node = simulation._index.get(key)
            if node is not None:
                node[REFS] += 1
                scores[i] += 1.0
                hits |= 1 << i
            elif charge <= simulation.capacity:
                simulation.insert_hashed(key, charge, h)
        if hits:
            disagreements = self._disagreements
            for pair in self._rule_pairs:
                if (hits >> pair[0] ^ hits >> pair[1]) & 1:
                    disagreements[pair] += 1.0
        margin = self._margin
        if self._warming:
            self._seen += 1
            if self._warm_start is None:
                if all(
                    simulation.departures
                    for simulation in self._simulations
                    if isinstance(simulation, WTinyLFUPolicy)
                ):
                    self._warm_start = self._seen
                    self._restart_scores([0.0] * len(scores))
                return
            if self._seen - self._warm_start >= self._warmup:
                self._warming = False
                current = scores[self.config]
                self._restart_scores([min(0.0, score - current) for score in scores])
                return
            if not self._warmup_margin:
                return
            margin *= self._warmup_margin
        self._requests += 1.0
        if self._requests >= self._decay_after:
            self._requests /= 2
            self._scores = scores = [score / 2 for score in scores]
            for pair, count in self._disagreements.items():
                self._disagreements[pair] = count / 2
            self._margin = max(self._switch_margin, self._margin * self._recovery)
        best = max(range(len(scores)), key=scores.__getitem__)
        lead = scores[best] - scores[self.config]
        if lead <= _MIN_LEAD:
            return
        requests = self._requests
        if _same_structure(configs[best], configs[self.config]):
            disagreed = self._disagreements[min(best, self.config), max(best, self.config)]
            if lead > self._rule_noise * disagreed**0.5 + _MIN_LEAD:
                self._adopt(best)
        else:
            if configs[best].arc or configs[self.config].arc:
                margin *= self._arc_margin
            if lead > margin * requests + self._noise * requests**0.5 + _MIN_LEAD:
                self._adopt(best)
                self._margin *= self._backoff

    def _restart_scores(self, scores: list[float]) -> None:
        """Score from `scores` on, with no request counted yet."""
        self._scores = scores
        self._requests = 0.0
        for pair in self._disagreements:
            self._disagreements[pair] = 0.0

    def _adopt(self, index: int) -> None:
        """Run configuration `index` from now on; no resident key leaves."""
        config = self._configs[index]
        simulation = self._simulations[index]
        if isinstance(simulation, ARCPolicy):
            self._to_arc(simulation)
        else:
            self.margin_from = config.margin_from
            self.lower_every = config.lower_every
            window_max = round(config.window_fraction * self.capacity)
            if self._arc is None:
                self.resize_window(window_max)
            else:
                self._set_window_max(window_max)
                self._from_arc()
        self.config = index

    def _to_arc(self, simulation: ARCPolicy) -> None:
        """Move the residents into an ARC: keys seen more than once to T2, the others to T1,
        coldest first (probation, protected, then the window), and T1's target scaled from
        the ARC simulation's."""
        recent: list[tuple[Key, int]] = []
        frequent: list[tuple[Key, int]] = []
        hashes = self._hashes
        for node in self.take_residents():
            key = node[KEY]
            (frequent if node[FREQ] >= 2 else recent).append((key, node[CHARGE]))
            hashes[key] = node[HASH]
        arc = ARCPolicy(self.capacity)
        arc.restore(recent, frequent, simulation.target * self.capacity / simulation.capacity)
        self._arc = arc

    def _from_arc(self) -> None:
        """Move the residents of the ARC back into this W-TinyLFU (whose window the caller has
        set), T1 before T2: coldest first."""
        assert self._arc is not None
        recent, frequent = self._arc.residents()
        hashes = self._hashes
        entries = [
            (key, charge, hashes[key], self._is_sampled(hashes[key]), seen_again)
            for keys, seen_again in ((recent, False), (frequent, True))
            for key, charge in keys
        ]
        self._arc = None
        self._hashes = {}
        self.restore(entries)

    def check_integrity(self) -> None:
        super().check_integrity()
        arc = self._arc
        assert (arc is not None) == self._configs[self.config].arc, "structure is not config's"
        if arc is not None:
            arc.check_integrity()
            assert not self._index, "W-TinyLFU holds keys while ARC runs"
            assert self._hashes.keys() == arc._charges.keys(), "hashes drifted"
            if self.max_entries is not None:
                assert len(arc) <= self.max_entries, "over the entry bound"
        for simulation in self._simulations:
            simulation.check_integrity()
