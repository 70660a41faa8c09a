"""The PNG plots of a `raycache bench` run (matplotlib's Agg backend: no display needed).

- `throughput.png`: answers per second over time, the workload's (all, hits, misses) beside the
  baseline's;
- `latency.png`: p50/p90/p99 latency of the baseline, and of the workload's hits, misses and
  all answers;
- `hit_ratio.png`: the workload's hit ratio per window and cumulative, against the expected
  ratio when one is known.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serve_app.cli.bench_report import HITS, PERCENTILES
from serve_app.cli.sender import MISS


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(report: dict[str, Any], directory: Path) -> list[Path]:
    """Write the three plots of `report` (as `raycache bench --json` prints it) under
    `directory`; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    paths = [
        _throughput(plt, report, directory / "throughput.png"),
        _latency(plt, report, directory / "latency.png"),
        _hit_ratio(plt, report, directory / "hit_ratio.png"),
    ]
    return paths


def _save(plt: Any, figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _throughput(plt: Any, report: dict[str, Any], path: Path) -> Path:
    figure, axes = plt.subplots(figsize=(8, 4.5))
    workload = report["workload"]["timeline"]
    ends = [row["end_s"] for row in workload]
    axes.plot(ends, [row["answers_per_s"] for row in workload], label="workload: all", lw=2)
    axes.plot(ends, [row["hits"] / report["window_s"] for row in workload], label="workload: hits")
    misses = [row["misses"] / report["window_s"] for row in workload]
    axes.plot(ends, misses, label="workload: misses")
    if report.get("baseline"):
        baseline = report["baseline"]["timeline"]
        axes.plot(
            [row["end_s"] for row in baseline],
            [row["answers_per_s"] for row in baseline],
            "--",
            label="baseline (no hits): all",
        )
    axes.set_xlabel("seconds into the phase")
    axes.set_ylabel("answers per second")
    axes.set_title("throughput")
    axes.grid(True, alpha=0.3)
    axes.legend()
    return _save(plt, figure, path)


def _latency(plt: Any, report: dict[str, Any], path: Path) -> Path:
    groups: list[tuple[str, dict[str, Any]]] = []
    if report.get("baseline"):
        groups.append(("baseline: all", report["baseline"]["summary"]["overall"]))
    outcomes = report["workload"]["summary"]["outcomes"]
    for name, label in ((HITS, "workload: hits"), (MISS, "workload: misses")):
        if name in outcomes:
            groups.append((label, outcomes[name]))
    groups.append(("workload: all", report["workload"]["summary"]["overall"]))
    figure, axes = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(PERCENTILES)
    for offset, q in enumerate(PERCENTILES):
        positions = [i + (offset - 1) * width for i in range(len(groups))]
        axes.bar(positions, [figures[f"p{q}_ms"] for _, figures in groups], width, label=f"p{q}")
    axes.set_xticks(range(len(groups)), [label for label, _ in groups])
    axes.set_ylabel("latency (ms, HTTP in to answer out)")
    axes.set_yscale("log")
    axes.set_title("latency by outcome")
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend()
    return _save(plt, figure, path)


def _hit_ratio(plt: Any, report: dict[str, Any], path: Path) -> Path:
    figure, axes = plt.subplots(figsize=(8, 4.5))
    rows = [row for row in report["workload"]["timeline"] if row["hit_ratio"] is not None]
    ends = [row["end_s"] for row in rows]
    axes.plot(ends, [100 * row["hit_ratio"] for row in rows], marker=".", label="per window")
    cumulative = [100 * row["cumulative_hit_ratio"] for row in rows]
    axes.plot(ends, cumulative, lw=2, label="cumulative")
    expected = report["config"].get("repeat")
    if expected is not None:
        axes.axhline(100 * expected, ls="--", color="grey", label=f"repeat ratio {expected:g}")
    axes.set_ylim(0, 100)
    axes.set_xlabel("seconds into the phase")
    axes.set_ylabel("hit ratio (%)")
    axes.set_title("hit ratio over time")
    axes.grid(True, alpha=0.3)
    axes.legend()
    return _save(plt, figure, path)
