"""Owner lookups per second on a 64-member ring (no actor call), and the ring's balance.

    python -m benchmarks.owner_lookup [--members 64] [--lookups 200000]
        [--json benchmarks/results/owner_lookup.json]

A replica computes owners from its local ring snapshot, so the directory is never on the request
path; this measures that path (key hashing included) and, for 2..64 members, the max/mean load
over 100,000 keys.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cluster.sharing.ring import Ring

ROOT = Path(__file__).resolve().parents[1]


def balance(members: int, keys: list[str]) -> float:
    ring = Ring({f"replica-{i}": 1.0 for i in range(members)})
    counts: dict[str, int] = {}
    for key in keys:
        owner = ring.owner(key)
        assert owner is not None
        counts[owner] = counts.get(owner, 0) + 1
    return max(counts.values()) / (len(keys) / members)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=64)
    parser.add_argument("--lookups", type=int, default=200_000)
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "owner_lookup.json"
    )
    options = parser.parse_args()
    ring = Ring({f"replica-{i}": 1.0 for i in range(options.members)})
    keys = [f"{i:064x}" for i in range(options.lookups)]
    started = time.perf_counter()
    for key in keys:
        ring.owner(key)
    elapsed = time.perf_counter() - started
    balance_keys = keys[:100_000]
    result = {
        "benchmark": "owner_lookup",
        "members": options.members,
        "lookups_per_s": options.lookups / elapsed,
        "ns_per_lookup": elapsed / options.lookups * 1e9,
        "max_over_mean_load": {n: balance(n, balance_keys) for n in (2, 4, 8, 16, 32, 64)},
    }
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{result['lookups_per_s']:,.0f} owner lookups/s on {options.members} members "
        f"({result['ns_per_lookup']:.0f} ns each); max/mean load: "
        + ", ".join(f"{n}: {v:.2f}" for n, v in result["max_over_mean_load"].items())
    )


if __name__ == "__main__":
    main()
