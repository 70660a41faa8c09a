"""How far the theine reference row moves with the hash it is given, beside the default policy.

    python -m benchmarks.theine_hashing [--trace NAME] [--capacities N[,N...]] [--runs R]
                                        [--json OUT]

The traces README's "adaptive W-TinyLFU (theine)" row comes from `theine-core`, whose sketch
picks a counter block from the low bits of the 64-bit hash it is handed. A harness that hands it
the trace's own ids (the identity hash) and one that hands it theine's `spread` of them measure
different things when ids are sequential, as block addresses are. This runs `TlfuCore` both
ways over one trace (every request: `access` on a hit, `set` on a miss), `--runs` times each
(theine admits at random above an estimate of 6, so runs differ), and the default policy once,
and prints the hit ratios side by side; the JSON goes to benchmarks/results/theine_hashing.json.

Default: cloudPhysicsIO at 4,897 and 9,795 entries, the two capacities where the default
policy is furthest below that row.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import theine_core

from benchmarks.hit_ratio_report import (
    RESULTS,
    THEINE,
    TRACES_DIR,
    parse_readme,
    theine_hit_ratio,
    trace_spec,
)
from cluster.simulation import traces
from cluster.simulation.simulate import DEFAULT_ALIAS, capacities_arg, simulate

HASHES: dict[str, Callable[[int], int]] = {
    "identity": lambda key: key & (2**64 - 1),
    "spread": theine_core.spread,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.theine_hashing", description=__doc__
    )
    parser.add_argument("--trace", default="cloudPhysicsIO", help="a traces README section")
    parser.add_argument("--capacities", type=capacities_arg, default=[4897, 9795])
    parser.add_argument("--runs", type=int, default=2, help="theine runs per hash")
    parser.add_argument("--json", type=Path, default=RESULTS / "theine_hashing.json")
    args = parser.parse_args(argv)

    spec = trace_spec(args.trace)
    if spec is None:
        parser.error(f"no trace file for {args.trace!r} in {TRACES_DIR}")
    references = {ref.name: ref for ref in parse_readme((TRACES_DIR / "README.md").read_text())}
    reference = references.get(args.trace)
    keys = traces.load(spec)
    started = time.perf_counter()
    rows: dict[str, Any] = {}
    if reference is not None and THEINE in reference.rows:
        by_capacity = dict(zip(reference.capacities, reference.rows[THEINE], strict=True))
        rows["reference (theine row)"] = [by_capacity.get(c) for c in args.capacities]
    for name, hash_of in HASHES.items():
        rows[f"theine, {name} hash"] = [
            [theine_hit_ratio(keys, capacity, hash_of) for _ in range(args.runs)]
            for capacity in args.capacities
        ]
    rows[DEFAULT_ALIAS] = simulate(keys, args.capacities, [DEFAULT_ALIAS])[DEFAULT_ALIAS]

    width = max(len(name) for name in rows)
    print(f"{args.trace}: {len(keys)} requests; hit ratio (%) at {args.capacities}")
    for name, values in rows.items():
        print(f"{name:<{width}}  {values}")
    report = {
        "trace": args.trace,
        "requests": len(keys),
        "capacities": args.capacities,
        "hit_ratio_pct": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
