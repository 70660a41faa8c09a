"""Hit ratios of eviction policies over a trace, at several capacities.

    raycache simulate --trace PATH --capacities N[,N...] [--policies a,b,...]
                      [--json OUT] [--plot OUT.png]

(`python -m benchmarks.simulate` is the same command.)

PATH is a trace file or a generator spec such as `zipf:0.8` (see `cluster.simulation.traces`).
Every object has charge 1 and capacities count objects. `--policies` defaults to every policy
registered in `cluster.local.policies`, then `opt` (Belady, `cluster.simulation.opt`); the
default policy is also reported under the name `default`. The policies run are the real classes from
`cluster.local.policies`, driven through their contract: `hit` on a resident key, else `insert`.

Prints a table (hit ratio in percent, plus seconds and microseconds per request of each run) and
optionally writes JSON (to a file, or alone on standard output with `--json -`) shaped exactly

    {"trace": NAME, "requests": N, "capacities": [...], "hit_ratio_pct": {policy: [...]}}

and a PNG plot of hit ratio against capacity, one line per policy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cluster.local.policies import DEFAULT_POLICY, EvictionPolicy, make_policy, policy_names
from cluster.simulation import traces
from cluster.simulation.opt import next_uses, opt_hits

DEFAULT_ALIAS = "default"
OPT = "opt"


def replay(policy: EvictionPolicy, keys: np.ndarray) -> int:
    """Drive `policy` through `keys` (hit if resident, else insert with charge 1); the hits."""
    hits = 0
    hit = policy.hit
    insert = policy.insert
    for begin in range(0, len(keys), traces.CHUNK):
        for key in keys[begin : begin + traces.CHUNK].tolist():
            if key in policy:
                hit(key)
                hits += 1
            else:
                insert(key, 1)
    return hits


def resolve(name: str) -> str:
    """The registered policy behind `name` (`default` is the default policy)."""
    return DEFAULT_POLICY if name == DEFAULT_ALIAS else name


def simulate(
    keys: np.ndarray,
    capacities: Sequence[int],
    policies: Sequence[str],
    options: dict[str, dict[str, Any]] | None = None,
    progress: Callable[[str, int, int, float], None] | None = None,
) -> dict[str, list[float]]:
    """Hit ratio (%) of each policy at each capacity; `default` and its target run once.

    `options` maps a registered policy name to keyword options for its factory; `progress` is
    called as `(policy, capacity, hits, seconds)` after each run.
    """
    options = options or {}
    requests = len(keys)
    computed: dict[str, list[float]] = {}
    results: dict[str, list[float]] = {}
    following = None
    for name in policies:
        real = resolve(name)
        if real not in computed:
            ratios = []
            for capacity in capacities:
                started = time.perf_counter()
                if real == OPT:
                    if following is None:
                        following = next_uses(keys)
                    hits = opt_hits(keys, capacity, following)
                else:
                    policy = make_policy(real, capacity, **options.get(real, {}))
                    hits = replay(policy, keys)
                if progress is not None:
                    progress(name, capacity, hits, time.perf_counter() - started)
                ratios.append(round(100.0 * hits / requests, 2) if requests else 0.0)
            computed[real] = ratios
        results[name] = computed[real]
    return results


def default_policies() -> list[str]:
    """Every registered policy, `default`, then `opt`."""
    return [*policy_names(), DEFAULT_ALIAS, OPT]


def format_table(capacities: Sequence[int], results: dict[str, list[float]]) -> str:
    """A text table: one row per policy, one column per capacity."""
    width = max([len("policy"), *(len(name) for name in results)])
    header = f"{'policy':<{width}} " + " ".join(f"{c:>9}" for c in capacities)
    lines = [header, "-" * len(header)]
    for name, ratios in results.items():
        lines.append(f"{name:<{width}} " + " ".join(f"{r:>9.2f}" for r in ratios))
    return "\n".join(lines)


def plot(
    path: Path, trace: str, capacities: Sequence[int], results: dict[str, list[float]]
) -> None:
    """Hit ratio against capacity, one line per policy (Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for name, ratios in results.items():
        style = "--" if name == OPT else "-"
        axes.plot(capacities, ratios, style, marker="o", label=name)
    axes.set_xlabel("capacity (objects)")
    axes.set_ylabel("hit ratio (%)")
    axes.set_title(trace)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def capacities_arg(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"capacities must be integers, got {text!r}") from None
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"capacities must be >= 1, got {text!r}")
    return values


def _policies(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    known = set(default_policies())
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown policies {unknown or text!r}; choose from {sorted(known)}"
        )
    return names


def main(argv: Sequence[str] | None = None, prog: str = "raycache simulate") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trace", required=True, help="trace file, or a spec like zipf:0.8")
    parser.add_argument("--capacities", required=True, type=capacities_arg, help="N[,N...]")
    parser.add_argument(
        "--policies", type=_policies, default=None, help="a,b,... (default: all, default, opt)"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="write results as JSON here (`-`: stdout)"
    )
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")
    args = parser.parse_args(argv)

    policies = args.policies or default_policies()
    json_to_stdout = args.json == Path("-")
    log = sys.stderr if json_to_stdout else sys.stdout  # stdout holds only the JSON then
    started = time.perf_counter()
    keys = traces.load(args.trace)
    name = traces.trace_name(args.trace)
    print(
        f"{name}: {len(keys):,} requests, loaded in {time.perf_counter() - started:.1f}s", file=log
    )

    def progress(policy: str, capacity: int, hits: int, seconds: float) -> None:
        per_request = 1e6 * seconds / max(len(keys), 1)
        print(
            f"  {policy:>10} @ {capacity:>8}: {100.0 * hits / max(len(keys), 1):6.2f}%"
            f"  {seconds:7.2f}s  {per_request:5.2f} us/request",
            file=log,
            flush=True,
        )

    results = simulate(keys, args.capacities, policies, progress=progress)
    print(format_table(args.capacities, results), file=log)
    print(f"total {time.perf_counter() - started:.1f}s", file=log)
    if args.json is not None:
        document = {
            "trace": name,
            "requests": len(keys),
            "capacities": args.capacities,
            "hit_ratio_pct": results,
        }
        text = json.dumps(document, indent=2) + "\n"
        if json_to_stdout:
            sys.stdout.write(text)
        else:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(text)
    if args.plot is not None:
        plot(args.plot, name, args.capacities, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
