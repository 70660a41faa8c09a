"""How the default policy compares with the reference hit ratios in the shared traces README,
and with reference policies on generated workload families.

    nice -n 10 python -m benchmarks.hit_ratio_report [--traces a,b,...|none]
        [--families chat,phase,...|none] [--option KEY=VALUE ...] [--no-lru] [--json OUT]

Runs the default policy (and `lru`, as a check on the trace readers: it should match the README's
LRU row) over every trace in the shared traces folder and over zipf:0.8 and zipf:1.0, at the
capacities the README lists for each, and reports the default policy's gap (default minus
reference, in hit-ratio points; negative is worse) to:

- the adaptive W-TinyLFU (theine) reference row,
- the LRU reference row,
- the best reference row of an online policy (every row but OPT),
- OPT (Belady).

Required: the default is never more than 1 point below theine and never more than 2 points
below LRU, at any capacity of any trace (a missing reference row skips that comparison). Every
violation is listed. The aim beyond that: within 1 point of the best reference everywhere.

Generated families (`cluster.simulation.workloads`, several settings each, `FAMILY_SETTINGS`)
have no README rows, so the references are computed here: our `lru`, `arc` and `tinylfu`, an
adaptive W-TinyLFU (`theine-core`, the README's theine row; the column is skipped when it is not
installed) and OPT. Per family: the default's worst and mean gap to LRU, ARC, theine, the best
classic policy (the best of LRU, ARC, W-TinyLFU and theine) and OPT, and the monotonicity
column: the largest drop of the default's hit ratio from one capacity to the next larger one.
Required there too: at most 2 points below LRU and below the best classic policy, at most 1
below theine, and no drop over 0.5 points as capacity grows.

`--option` passes keyword options to the default policy's factory (for tuning experiments);
the JSON goes to benchmarks/results/hit_ratio_report.json unless `--json` says otherwise. The
whole report takes about half an hour on a busy machine (the ARC traces are most of it: P6 is
12.7 million requests); `--traces`/`--families` run parts, `--traces none` only the families.

Notes on the default policy (`cluster.local.policies.adaptive`), measured with this report:

- Why several configurations: fixed W-TinyLFUs differ by up to 25 points between workloads. On
  the chat family a 1% window gets 43% at 10,000 entries where LRU and a window of the whole
  cache get 70%; on LIRS cs at 141 entries strict admission gets 9.1% and the whole window 1.8%;
  on CloudPhysics at 9,795 lowering victims lifts a 1% window from 27.7% to 31.6%; on the
  trend family a 20% window lowering victims every 2nd rejection gets 28.6% at 250 entries
  where ARC gets 30.3% and the 1% windows 27.3% or less (hence ARC among the configurations:
  with it the default gets within 0.3 points of ARC there, and within 0.9 on ARC's P3, where
  it was 5.8 below).
- Why a warm-up after the fill: on CloudPhysics at 19,590 entries the whole window leads just
  after the fill; a policy that followed it fell to 39.3% (46.9% with the warm-up).
- Why a growing margin: on LIRS zigzag strict admission and the whole window win alternate
  phases; without the backoff the policy switched 26 times and fell to 10% at 400 entries
  (17.7% with it; LRU 19.2%).
- Why a switch of admission rule alone needs only a lead over chance: on CloudPhysics at 9,795
  entries strict admission led the 1% window with lowering on scores built up in an earlier
  phase and kept the lead long after lowering had overtaken it, under a margin that grows with
  the requests; the policy got 25.7% (27.5% with the cheaper switch; the 1% window with
  lowering alone 31.6%).
- Why chance is judged by the requests two rules disagree on: on LIRS gli (6,015 requests) the
  strict rule leads the one the policy starts with by 2 points, but by less than
  1.25 sqrt(requests) hits: the policy never switched and got 14.7% at 250 entries (theine
  15.8%). The two rules disagree on a tenth of the requests or less, and a lead of 2 standard
  deviations of those switches at request 2,084: 16.8%. The cost: on LIRS cs at 564 entries
  it switches at request 1,435 instead of 2,759 and gets 32.2% instead of 33.6% (theine 33.7%).
- Why warm-up deficits are kept: on CloudPhysics at 9,795 entries the whole window was 681
  hits behind during the warm-up, then led a burst of 474 requests right after it; the policy
  followed it there, came back 50,000 requests later (the scores remembered that burst) and
  got 27.5%. Starting the whole window 681 hits behind, it stays with the 1% window: 32.6%
  (theine 31.0%).
- Why the denser sketch (`width_factor` 8): the admission rules compare estimates that differ
  by one access, so collisions decide admissions; at 16 counters per entry a W-TinyLFU got 11.0%
  on LIRS gli at 250 entries, at 32 16.5%.
- Known misses (2026-12-06; the JSON lists every one): theine's row on LIRS cs at 564 entries
  (-1.5, see above); the phase family at 10,000 entries (-2.2 to LRU on `phase:`, -2.1 to ARC
  on `phase:alpha=0.7,...`): the first phase fills the cache, and the scores of a whole phase
  in which the 1% windows led keep the policy from following the whole window for 15,000 to
  30,000 requests after the key set changes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.local.policies import DEFAULT_POLICY
from cluster.simulation import traces
from cluster.simulation.simulate import DEFAULT_ALIAS, simulate
from cluster.simulation.simulate import OPT as OPT_POLICY

try:
    import theine_core
except ImportError:  # an optional benchmark dependency: its column is skipped
    theine_core = None

TRACES_DIR = Path(__file__).resolve().parents[2] / "shared" / "traces"
RESULTS = Path(__file__).resolve().parent / "results"
GENERATED = {"zipf0.8": "zipf:0.8", "zipf1.0": "zipf:1.0"}
THEINE = "adaptive W-TinyLFU (theine)"
LRU = "LRU"
OPT = "OPT(Belady)"
THEINE_SLACK = 1.0
LRU_SLACK = 2.0
BEST_SLACK = 1.0
CLASSIC_SLACK = 2.0
MONOTONE_SLACK = 0.5
FAMILY_CAPACITIES = [250, 500, 1000, 2000, 5000, 10000]
FAMILY_SETTINGS: dict[str, list[str]] = {
    "chat": [
        "chat:window=2000",
        "chat:hot=0.3,turns=16,keys=8,window=5000",
        "chat:hot=0.05,turns=4,keys=3,window=1000",
        "chat:prompts=200,keys=6,window=20000",
    ],
    "phase": [
        "phase:",
        "phase:sets=2,phase=30000",
        "phase:alpha=0.7,keys=50000,phase=100000",
    ],
    "scan": [
        "scan:",
        "scan:hot=5000,length=20000,every=10000",
        "scan:alpha=1.1,hot=50000,length=5000,every=50000",
    ],
    "loop": [
        "loop:length=2000,noise=0.2",
        "loop:length=8000,noise=0.5",
        "loop:length=1000,noise=0.05",
    ],
    "trend": [
        "trend:",
        "trend:speed=0.2",
        "trend:alpha=1.1,speed=0.01",
    ],
}


@dataclass(frozen=True)
class Reference:
    """One README section: a trace's capacities and each reference policy's hit ratios (%)."""

    name: str
    capacities: list[int]
    rows: dict[str, list[float]]


def parse_readme(text: str) -> list[Reference]:
    """The reference tables of the traces README, in order."""
    references = []
    sections = re.split(r"^### ", text, flags=re.M)[1:]
    for section in sections:
        title = re.match(r"(\S+)\s+\(capacities \[([\d, ]+)\]\)", section)
        if title is None:
            continue
        capacities = [int(value) for value in title.group(2).split(",")]
        rows = {}
        for line in section.splitlines():
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if len(cells) != len(capacities) + 1 or cells[0] in ("policy", "") or "---" in line:
                continue
            rows[cells[0]] = [float(cell) for cell in cells[1:]]
        references.append(Reference(title.group(1), capacities, rows))
    return references


def trace_spec(name: str) -> str | None:
    """The file (or generator) for README section `name`; None when absent."""
    if name in GENERATED:
        return GENERATED[name]
    for path in sorted(TRACES_DIR.iterdir()):
        if path.suffix != ".md" and traces.trace_name(str(path)) == name:
            return str(path)
    return None


def gaps(ours: list[float], reference: list[float] | None) -> list[float] | None:
    """Ours minus the reference, per capacity (None without a reference)."""
    if reference is None:
        return None
    return [round(a - b, 2) for a, b in zip(ours, reference, strict=True)]


def best_online(rows: dict[str, list[float]]) -> list[float]:
    """Per capacity, the best hit ratio among the reference rows other than OPT."""
    online = [values for policy, values in rows.items() if policy != OPT]
    return [max(column) for column in zip(*online, strict=True)]


def evaluate(reference: Reference, ours: list[float]) -> dict[str, Any]:
    """Gaps and violations of `ours` (the default policy) against one reference table."""
    rows = reference.rows
    against = {
        "theine": gaps(ours, rows.get(THEINE)),
        "lru": gaps(ours, rows.get(LRU)),
        "best": gaps(ours, best_online(rows)),
        "opt": gaps(ours, rows.get(OPT)),
    }
    violations = []
    slack = {"theine": THEINE_SLACK, "lru": LRU_SLACK}
    for kind, limit in slack.items():
        values = against[kind]
        for capacity, gap in zip(reference.capacities, values or [], strict=False):
            if gap < -limit:
                violations.append(f"{reference.name} @ {capacity}: {gap:+.2f} vs {kind}")
    misses_aim = [
        f"{reference.name} @ {capacity}: {gap:+.2f} vs best"
        for capacity, gap in zip(reference.capacities, against["best"] or [], strict=True)
        if gap < -BEST_SLACK
    ]
    return {"gaps": against, "violations": violations, "misses_aim": misses_aim}


def _identity(key: int) -> int:
    return key & (2**64 - 1)


def theine_hit_ratio(
    keys: Any, capacity: int, hash_of: Callable[[int], int] | None = None
) -> float:
    """Hit ratio (%) of theine-core's adaptive W-TinyLFU of `capacity` entries over `keys`,
    handed the keys hashed by `hash_of`; by default the keys themselves, as the README's theine
    row was measured (`benchmarks.theine_hashing`)."""
    core = theine_core.TlfuCore(capacity)
    spread = _identity if hash_of is None else hash_of
    resident: set[int] = set()
    hits = 0
    for begin in range(0, len(keys), traces.CHUNK):
        for key in keys[begin : begin + traces.CHUNK].tolist():
            hashed = spread(key)
            if hashed in resident:
                hits += 1
                core.access([hashed])
            else:
                resident.difference_update(core.set([(hashed, 0)]))
                resident.add(hashed)
    return round(100.0 * hits / len(keys), 2) if len(keys) else 0.0


def largest_drop(ratios: list[float]) -> float:
    """The largest fall of a hit ratio from one capacity to the next larger one (0 if none)."""
    return round(max([0.0, *(a - b for a, b in itertools.pairwise(ratios))]), 2)


def run_setting(spec: str, capacities: list[int], options: dict[str, Any]) -> dict[str, Any]:
    """The default and the reference policies on generated workload `spec`."""
    keys = traces.load(spec)
    policies = [DEFAULT_ALIAS, "lru", "arc", "tinylfu", OPT_POLICY]
    results = simulate(keys, capacities, policies, options={DEFAULT_POLICY: options})
    if theine_core is not None:
        results["theine"] = [theine_hit_ratio(keys, capacity) for capacity in capacities]
    ours = results[DEFAULT_ALIAS]
    classic = [name for name in ("lru", "arc", "tinylfu", "theine") if name in results]
    best = [max(column) for column in zip(*(results[name] for name in classic), strict=True)]
    against = {
        "lru": gaps(ours, results["lru"]),
        "arc": gaps(ours, results["arc"]),
        "theine": gaps(ours, results.get("theine")),
        "best": gaps(ours, best),
        "opt": gaps(ours, results[OPT_POLICY]),
    }
    violations = []
    for kind, limit in (("lru", LRU_SLACK), ("theine", THEINE_SLACK), ("best", CLASSIC_SLACK)):
        for capacity, gap in zip(capacities, against[kind] or [], strict=False):
            if gap < -limit:
                violations.append(f"{spec} @ {capacity}: {gap:+.2f} vs {kind}")
    drop = largest_drop(ours)
    if drop > MONOTONE_SLACK:
        violations.append(f"{spec}: hit ratio falls by {drop:.2f} as capacity grows")
    return {
        "requests": len(keys),
        "capacities": capacities,
        "hit_ratio_pct": results,
        "gaps": against,
        "largest_drop": drop,
        "violations": violations,
    }


def run_families(names: list[str], options: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Every setting of each family in `names`; per family the worst and mean gaps."""
    report: dict[str, Any] = {}
    violations: list[str] = []
    kinds = ("lru", "arc", "theine", "best", "opt")
    print(f"\n{'family worst/mean':<18} " + "  ".join(f"{k:>15}" for k in kinds) + "  max drop")
    for family in names:
        started = time.perf_counter()
        settings = {
            spec: run_setting(spec, FAMILY_CAPACITIES, options) for spec in FAMILY_SETTINGS[family]
        }
        pooled: dict[str, list[float]] = {kind: [] for kind in kinds}
        for spec, entry in settings.items():
            violations += entry["violations"]
            for kind in kinds:
                pooled[kind] += entry["gaps"][kind] or []
            line = "  ".join(_summary(entry["gaps"][kind]) for kind in kinds)
            print(f"  {spec:<40}\n  {'':<16} {line}  {entry['largest_drop']:8.2f}", flush=True)
        drop = max(entry["largest_drop"] for entry in settings.values())
        report[family] = {
            "settings": settings,
            "worst": {kind: min(v) for kind, v in pooled.items() if v},
            "mean": {kind: round(sum(v) / len(v), 2) for kind, v in pooled.items() if v},
            "largest_drop": drop,
            "seconds": round(time.perf_counter() - started, 1),
        }
        line = "  ".join(_summary(pooled[kind]) for kind in kinds)
        print(f"{family:<18} {line}  {drop:8.2f}", flush=True)
    return report, violations


def _summary(values: list[float] | None) -> str:
    if not values:
        return f"{'-':>15}"
    return f"{min(values):+7.2f} {sum(values) / len(values):+7.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.hit_ratio_report", description=__doc__
    )
    parser.add_argument(
        "--traces", default=None, help="only these README sections: a,b,... (`none`: no trace)"
    )
    parser.add_argument(
        "--families",
        default=None,
        help=f"only these generated families: a,b,... of {list(FAMILY_SETTINGS)} (`none`: none)",
    )
    parser.add_argument("--option", action="append", default=[], help="KEY=VALUE for the policy")
    parser.add_argument("--no-lru", action="store_true", help="skip the LRU check runs")
    parser.add_argument("--json", type=Path, default=RESULTS / "hit_ratio_report.json")
    args = parser.parse_args(argv)

    options: dict[str, Any] = {}
    for item in args.option:
        key, _, value = item.partition("=")
        options[key] = json.loads(value)
    references = parse_readme((TRACES_DIR / "README.md").read_text())
    if args.traces:
        wanted = set(args.traces.split(","))
        references = [reference for reference in references if reference.name in wanted]
    families = list(FAMILY_SETTINGS)
    if args.families:
        families = [name for name in args.families.split(",") if name != "none"]
        unknown = sorted(set(families) - set(FAMILY_SETTINGS))
        if unknown:
            parser.error(f"unknown families {unknown}; choose from {list(FAMILY_SETTINGS)}")

    report: dict[str, Any] = {"policy": DEFAULT_POLICY, "options": options, "traces": {}}
    all_gaps: dict[str, list[float]] = {"theine": [], "lru": [], "best": [], "opt": []}
    violations: list[str] = []
    misses_aim: list[str] = []
    lru_drift: list[str] = []
    started = time.perf_counter()
    header = "  ".join(f"{kind:>15}" for kind in all_gaps)
    print(f"{'gap worst/mean':<15} {header}   drop  seconds  default hit ratios (%)")
    for reference in references:
        spec = trace_spec(reference.name)
        if spec is None:
            print(f"{reference.name}: no trace file, skipped")
            continue
        trace_started = time.perf_counter()
        keys = traces.load(spec)
        policies = [DEFAULT_ALIAS] if args.no_lru else [DEFAULT_ALIAS, "lru"]
        results = simulate(keys, reference.capacities, policies, options={DEFAULT_POLICY: options})
        seconds = time.perf_counter() - trace_started
        ours = results[DEFAULT_ALIAS]
        verdict = evaluate(reference, ours)
        violations += verdict["violations"]
        misses_aim += verdict["misses_aim"]
        for kind, values in verdict["gaps"].items():
            all_gaps[kind] += values or []
        entry: dict[str, Any] = {
            "requests": len(keys),
            "capacities": reference.capacities,
            "default": ours,
            "largest_drop": largest_drop(ours),
            "seconds": round(seconds, 1),
            **verdict,
        }
        if "lru" in results and LRU in reference.rows:
            drift = max(
                abs(a - b) for a, b in zip(results["lru"], reference.rows[LRU], strict=True)
            )
            entry["lru_ours"] = results["lru"]
            entry["lru_max_abs_diff_to_ref"] = round(drift, 2)
            if drift > 0.5:
                lru_drift.append(f"{reference.name}: our LRU differs by {drift:.2f}")
        report["traces"][reference.name] = entry
        line = "  ".join(_summary(verdict["gaps"][kind]) for kind in all_gaps)
        drop = largest_drop(ours)
        print(f"{reference.name:<15} {line}  {drop:5.2f}  {seconds:6.1f}s  {ours}", flush=True)

    report["families"], family_violations = run_families(families, options)
    violations += family_violations
    total = time.perf_counter() - started
    overall = {kind: (min(v), round(sum(v) / len(v), 2)) for kind, v in all_gaps.items() if v}
    report.update(
        overall={kind: {"worst": w, "mean": m} for kind, (w, m) in overall.items()},
        violations=violations,
        misses_aim=misses_aim,
        lru_drift=lru_drift,
        required_conditions_hold=not violations,
        seconds=round(total, 1),
    )
    print(f"\n{'gap worst/mean':<15} {header}")
    print(f"{'overall':<15} " + "  ".join(_summary(all_gaps[kind]) for kind in all_gaps))
    print(f"\nrequired conditions hold: {not violations}")
    for violation in violations:
        print(f"  VIOLATION {violation}")
    print(f"aim (within {BEST_SLACK} of best): {len(misses_aim)} misses")
    for miss in misses_aim:
        print(f"  {miss}")
    for drift in lru_drift:
        print(f"  LRU CHECK {drift}")
    print(f"total {total:.0f}s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
