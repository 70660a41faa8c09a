"""The `raycache` command (a console script of the package): see `raycache --help`.

Every command talks to the cluster at `--url` (or `RAYCACHE_URL`) over its HTTP API, prints
tables for people and, with `--json`, one JSON document on standard output for scripts.
A failure is one line on standard error, `raycache: error: ...`, and an exit code from
`serve_app.cli.errors.ExitCode`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from serve_app.cli import rollout
from serve_app.cli.bench import BenchConfig, LiveProgress, render_report, run_bench
from serve_app.cli.client import DEFAULT_URL, URL_ENV, Cluster, api_key, bearer
from serve_app.cli.errors import CliError, ExitCode
from serve_app.cli.plots import write_plots
from serve_app.cli.sender import SendOptions, send
from serve_app.cli.status import read_status, render_status
from serve_app.cli.warm import read_calls, summarize

app = typer.Typer(
    name="raycache",
    help="See and steer a running raycache cluster over its HTTP API.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Paragraphs of the help text reflow to the terminal's width.
    rich_markup_mode="markdown",
)
out = Console()
err = Console(stderr=True)

Url = Annotated[str, typer.Option("--url", envvar=URL_ENV, help="The cluster's HTTP address.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document for scripts.")]
Timeout = Annotated[
    float, typer.Option(help="Seconds to wait for every replica's acknowledgement.")
]
Command = TypeVar("Command", bound=Callable[..., Any])


def reports_failures(command: Command) -> Command:
    """Turn a `CliError` into its one line on standard error and its exit code."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except CliError as exc:
            fail(exc.message)
            raise typer.Exit(int(exc.code)) from None

    return run  # type: ignore[return-value]


def fail(message: str) -> None:
    """The one line of a failure, unwrapped whatever the terminal's width."""
    sys.stderr.write(f"raycache: error: {message}\n")


def print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2) + "\n")


def default_model(cluster: Cluster, model: str | None) -> str:
    """`model`, or else the first model the cluster lists."""
    if model:
        return model
    listed = cluster.get("/v1/models")["data"]
    if not listed:
        raise CliError("the cluster serves no model", ExitCode.REFUSED)
    return str(listed[0]["id"])


@app.command()
@reports_failures
def status(url: Url = DEFAULT_URL, as_json: Json = False) -> None:
    """Models and their versions, replicas, Redis, and hit ratios per tier."""
    with Cluster(url) as cluster:
        document = read_status(cluster)
    if as_json:
        print_json(document)
    else:
        render_status(document, out)


@app.command()
@reports_failures
def publish(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="The model's id.")],
    version: Annotated[str, typer.Argument(metavar="VERSION", help="The new version's label.")],
    seed: Annotated[
        int | None, typer.Option(help="Weights built from this seed (built-in models).")
    ] = None,
    checkpoint: Annotated[
        str | None, typer.Option(help="Weights from this checkpoint (inside checkpoint_dir).")
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Allow going back to an older version or label.")
    ] = False,
    timeout: Timeout = 30.0,
    url: Url = DEFAULT_URL,
    as_json: Json = False,
) -> None:
    """Roll out VERSION of MODEL and show which replicas acknowledged (admin token)."""
    if (seed is None) == (checkpoint is None):
        raise CliError("give exactly one of --seed and --checkpoint", ExitCode.USAGE)
    with Cluster(url, timeout_s=timeout + 30) as cluster:
        answer = rollout.publish(cluster, model, version, seed, checkpoint, force, timeout)
    _acknowledged(answer, f"{model} version {version}", as_json)


@app.command()
@reports_failures
def invalidate(
    model: Annotated[str | None, typer.Option(help="Answers of this model.")] = None,
    version: Annotated[str | None, typer.Option(help="Answers of this version.")] = None,
    tenant: Annotated[str | None, typer.Option(help="Answers of this tenant.")] = None,
    key: Annotated[str | None, typer.Option(help="The answer with this `cache.key`.")] = None,
    timeout: Timeout = 30.0,
    url: Url = DEFAULT_URL,
    as_json: Json = False,
) -> None:
    """Drop cached answers by model, version, tenant or key (admin token).

    Every given selector must match; they go on every replica and in Redis.
    """
    selector = {
        name: value
        for name, value in (
            ("model", model),
            ("version", version),
            ("tenant", tenant),
            ("key", key),
        )
        if value is not None
    }
    if not selector:
        raise CliError("give at least one of --model, --version, --tenant, --key", ExitCode.USAGE)
    with Cluster(url, timeout_s=timeout + 30) as cluster:
        answer = rollout.invalidate(cluster, selector, timeout)
    described = ", ".join(f"{name} {value}" for name, value in selector.items())
    _acknowledged(answer, f"invalidate {described}", as_json)


def _acknowledged(answer: dict[str, Any], title: str, as_json: bool) -> None:
    if as_json:
        print_json(answer)
    else:
        rollout.acknowledgements(answer, title, out)
    if not rollout.complete(answer):
        raise typer.Exit(int(ExitCode.PARTIAL))


@app.command()
@reports_failures
def warm(
    file: Annotated[
        Path, typer.Argument(metavar="FILE", help="Prompts or chat transcripts, one JSON per line.")
    ],
    model: Annotated[
        str | None, typer.Option(help="Model of lines that name none (default: the first).")
    ] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="max_tokens of lines without.")] = 16,
    rate: Annotated[float, typer.Option(min=0.01, help="At most this many requests/s.")] = 10.0,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight at most.")] = 4,
    url: Url = DEFAULT_URL,
    as_json: Json = False,
) -> None:
    """Cache the answers and prefixes of FILE's prompts and transcripts.

    Sends them (with the API key in RAYCACHE_API_KEY, if any) at a bounded rate, and reports
    hits, misses and tokens cached.
    """
    with Cluster(url) as cluster:
        calls = read_calls(file, default_model(cluster, model), max_tokens)
    options = SendOptions(concurrency=concurrency, rate=rate, headers=bearer(api_key()))
    with LiveProgress(err) as progress:
        samples = asyncio.run(send(url, calls, options, progress.phase("warm", len(calls))))
    summary = summarize(samples)
    if as_json:
        print_json(summary)
    else:
        hits = ", ".join(f"{tier} {count}" for tier, count in summary["hits"].items())
        out.print(
            f"{summary['requests']} sent: hits ({hits}), {summary['misses']} computed and "
            f"cached, {summary['uncached']} not cacheable, {summary['failed']} failed; "
            f"{summary['tokens_cached']} tokens cached, {summary['prefix_tokens_reused']} "
            "prompt tokens from the prefix cache"
        )
    if summary["failed"]:
        fail(str(summary["first_error"]))
        raise typer.Exit(int(ExitCode.PARTIAL))


@app.command()
@reports_failures
def bench(
    requests: Annotated[int, typer.Option(min=1, help="Requests per phase.")] = 200,
    repeat: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of requests repeating an earlier one.")
    ] = 0.35,
    trace: Annotated[
        str | None, typer.Option(help="A trace file or spec (zipf:0.8) instead of --repeat.")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Clients (requests in flight).")] = 4,
    rate: Annotated[
        float | None, typer.Option(min=0.01, help="Requests/s (paces a closed loop).")
    ] = None,
    open_loop: Annotated[
        bool, typer.Option(help="Send at Poisson arrivals of --rate, whatever the pace.")
    ] = False,
    model: Annotated[str | None, typer.Option(help="The model (default: the first).")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="max_tokens of each request.")] = 16,
    prompt_words: Annotated[int, typer.Option(min=1, help="Words per prompt.")] = 8,
    baseline: Annotated[
        bool, typer.Option(help="First run a phase of new prompts only (no hits) to compare.")
    ] = True,
    warmup: Annotated[
        int, typer.Option(min=0, help="Unmeasured requests (new prompts) sent first.")
    ] = 10,
    window: Annotated[float, typer.Option(min=0.1, help="Seconds per timeline window.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the repeats and arrivals.")] = 0,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Where bench.json and the PNG plots go.")
    ] = Path("raycache-bench"),
    url: Url = DEFAULT_URL,
    as_json: Json = False,
) -> None:
    """Load the cluster and measure throughput and latency with and without hits.

    Sends completions (with the API key in RAYCACHE_API_KEY, if any): a baseline phase of new
    prompts, then the workload; prints throughput, latency by outcome and the hit ratio, and
    writes bench.json and PNG plots.
    """
    if open_loop and rate is None:
        raise CliError("--open-loop needs --rate", ExitCode.USAGE)
    with Cluster(url) as cluster:
        chosen = default_model(cluster, model)
    config = BenchConfig(
        model=chosen,
        requests=requests,
        repeat=None if trace else repeat,
        trace=trace,
        concurrency=concurrency,
        rate=rate,
        open_loop=open_loop,
        max_tokens=max_tokens,
        prompt_words=prompt_words,
        baseline=baseline,
        warmup=warmup,
        window_s=window,
        seed=seed,
    )
    try:
        with LiveProgress(err) as progress:
            report = run_bench(url, config, bearer(api_key()), progress.phase)
    except (ValueError, OSError) as exc:
        raise CliError(f"bad workload: {exc}", ExitCode.USAGE) from None
    directory = out_dir / report["config"]["run_id"]
    directory.mkdir(parents=True, exist_ok=True)
    report["files"] = [str(path) for path in write_plots(report, directory)]
    (directory / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    report["files"].append(str(directory / "bench.json"))
    _check_answered(report)
    if as_json:
        print_json(report)
    else:
        render_report(report, out)
        for path in report["files"]:
            out.print(f"wrote {path}", soft_wrap=True, highlight=False)
    if any(
        report[phase]["summary"]["failed"] for phase in ("baseline", "workload") if phase in report
    ):
        raise typer.Exit(int(ExitCode.PARTIAL))


def _check_answered(report: dict[str, Any]) -> None:
    """A run where nothing was answered says why in one line, instead of a table of zeros."""
    summary = report["workload"]["summary"]
    if summary["requests"] and summary["failed"] == summary["requests"]:
        raise CliError(
            "every request failed; check --url, RAYCACHE_API_KEY and --model "
            f"(figures in {report['files'][-1]})",
            ExitCode.PARTIAL,
        )


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def simulate(context: typer.Context) -> None:
    """Simulate the eviction policies on a trace (--help for its flags).

    Hit ratios of every policy at several capacities; the same command as
    `python -m benchmarks.simulate`.
    """
    from cluster.simulation.simulate import main as simulator

    raise typer.Exit(simulator(context.args))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
