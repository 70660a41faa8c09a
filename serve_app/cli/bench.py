"""`raycache bench`: load the cluster over HTTP and measure what its cache does for throughput
and latency.

After a few unmeasured warm-up requests, a run has two phases of the same size, sent the same
way (closed or open loop):
- the baseline: every request a new prompt, so nothing hits (the cluster without hits);
- the workload: a repeat ratio or a trace (`serve_app.cli.workload`).
The report (what `--json` prints and `bench.json` holds) has the run's settings (`config`),
each phase's `summary` and `timeline` (`serve_app.cli.bench_report`), and `comparison`: the
workload's throughput and latency as multiples of the baseline's.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from serve_app.cli.bench_report import OUTCOME_ORDER, compare, summarize, timeline
from serve_app.cli.sender import Call, Sample, SendOptions, send
from serve_app.cli.workload import repeat_workload, trace_workload


@dataclass(frozen=True)
class BenchConfig:
    model: str
    requests: int = 200
    repeat: float | None = 0.35
    trace: str | None = None
    concurrency: int = 4
    rate: float | None = None
    open_loop: bool = False
    max_tokens: int = 16
    prompt_words: int = 8
    baseline: bool = True
    warmup: int = 10
    window_s: float = 1.0
    seed: int = 0
    run_id: str = ""


def workload_calls(config: BenchConfig, run_id: str) -> list[Call]:
    if config.trace is not None:
        return trace_workload(
            config.trace,
            config.requests,
            run_id,
            config.model,
            config.max_tokens,
            config.prompt_words,
        )
    return repeat_workload(
        config.requests,
        config.repeat or 0.0,
        run_id,
        config.model,
        config.max_tokens,
        config.prompt_words,
        config.seed,
    )


Progressed = Callable[[str, int], Callable[[Sample], None]]
"""Given a phase's name and size, the callback its samples go to as they come."""


def run_bench(
    url: str, config: BenchConfig, headers: dict[str, str], progressed: Progressed
) -> dict[str, Any]:
    """Run the phases against the cluster at `url`; the report (see the module docstring)."""
    run_id = config.run_id or secrets.token_hex(4)
    options = SendOptions(
        concurrency=config.concurrency,
        rate=config.rate,
        open_loop=config.open_loop,
        seed=config.seed,
        headers=headers,
    )
    if config.warmup:
        # Unmeasured: the first requests after a start pay for lazy set-up that would
        # otherwise slow whichever phase comes first.
        warmup = repeat_workload(
            config.warmup, 0.0, f"{run_id}-warm", config.model, config.max_tokens
        )
        asyncio.run(send(url, warmup, options, progressed("warm-up", len(warmup))))
    phases: dict[str, list[Call]] = {}
    if config.baseline:
        # Its own run id: none of its prompts is one the workload asks.
        phases["baseline"] = repeat_workload(
            config.requests,
            0.0,
            f"{run_id}-base",
            config.model,
            config.max_tokens,
            config.prompt_words,
        )
    phases["workload"] = workload_calls(config, run_id)
    report: dict[str, Any] = {
        "config": {**asdict(config), "run_id": run_id, "url": url},
        "window_s": config.window_s,
    }
    for name, calls in phases.items():
        samples = asyncio.run(send(url, calls, options, progressed(name, len(calls))))
        report[name] = {
            "summary": summarize(samples),
            "timeline": timeline(samples, config.window_s),
        }
    if config.baseline:
        report["comparison"] = compare(report["workload"]["summary"], report["baseline"]["summary"])
    return report


class LiveProgress:
    """A progress bar per phase, with its hit ratio and pace so far, on `console`."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            TextColumn("{task.description:>9}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("hits {task.fields[hit_ratio]:>5.1%}  failed {task.fields[failed]}"),
            TimeElapsedColumn(),
            console=console,
        )

    def __enter__(self) -> LiveProgress:
        self._progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._progress.stop()

    def phase(self, name: str, size: int) -> Callable[[Sample], None]:
        task = self._progress.add_task(name, total=size, hit_ratio=0.0, failed=0)
        seen = {"answered": 0, "hits": 0, "failed": 0}

        def on_sample(sample: Sample) -> None:
            if sample.outcome == "error":
                seen["failed"] += 1
            else:
                seen["answered"] += 1
                seen["hits"] += sample.hit
            ratio = seen["hits"] / seen["answered"] if seen["answered"] else 0.0
            self._progress.update(task, advance=1, hit_ratio=ratio, failed=seen["failed"])

        return on_sample


def render_report(report: dict[str, Any], console: Console) -> None:
    """The run's figures as a table (a row per phase and outcome) and the comparison."""
    table = Table(title=f"raycache bench (run {report['config']['run_id']})")
    for column in ("phase", "outcome", "requests", "req/s", "p50 ms", "p90 ms", "p99 ms"):
        table.add_column(column, justify="left" if column in ("phase", "outcome") else "right")
    for phase in ("baseline", "workload"):
        if phase not in report:
            continue
        summary = report[phase]["summary"]
        rows = [("all", summary["overall"])]
        rows += [(o, summary["outcomes"][o]) for o in OUTCOME_ORDER if o in summary["outcomes"]]
        for outcome, figures in rows:
            table.add_row(
                phase,
                outcome,
                str(figures["requests"]),
                f"{figures['requests_per_s']:.1f}",
                f"{figures['p50_ms']:.1f}",
                f"{figures['p90_ms']:.1f}",
                f"{figures['p99_ms']:.1f}",
            )
        table.add_section()
    console.print(table)
    workload = report["workload"]["summary"]
    console.print(
        f"workload: {workload['requests_per_s']:.1f} req/s, hit ratio {workload['hit_ratio']:.1%}"
        f", {workload['failed']} failed"
    )
    comparison = report.get("comparison")
    if comparison:
        console.print(
            "against the baseline (no hits): "
            + ", ".join(
                f"{label} x{value:.2f}"
                for label, value in (
                    ("throughput", comparison["throughput_x"]),
                    ("p50 latency", comparison["p50_latency_x"]),
                    ("hit p50 / miss p50", comparison["hit_vs_miss_p50_x"]),
                )
                if value is not None
            )
        )
