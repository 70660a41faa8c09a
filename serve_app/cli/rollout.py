"""`raycache publish` and `raycache invalidate`: the admin routes, and who acknowledged.

Both return the route's answer; `acknowledgements` draws it as a table of replicas (each
`acknowledged`, `missing` or `failed` with its reason), and `complete` says whether every
replica applied it (otherwise the command exits with `ExitCode.PARTIAL`).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from rich.console import Console
from rich.table import Table

from serve_app.cli.client import Cluster


def publish(
    cluster: Cluster,
    model: str,
    version: str,
    seed: int | None,
    checkpoint: str | None,
    force: bool,
    timeout_s: float,
) -> dict[str, Any]:
    """`POST /v1/models/{model}/version`: make `version` (weights from `seed` or `checkpoint`)
    current and wait up to `timeout_s` for every replica."""
    body: dict[str, Any] = {"version": version, "force": force, "timeout_s": timeout_s}
    if seed is not None:
        body["seed"] = seed
    if checkpoint is not None:
        body["checkpoint"] = checkpoint
    answer: dict[str, Any] = cluster.post(
        f"/v1/models/{quote(model, safe='')}/version", body, admin=True
    )
    return answer


def invalidate(cluster: Cluster, selector: dict[str, str], timeout_s: float) -> dict[str, Any]:
    """`POST /v1/cache/invalidate`: drop every cached answer matching all of `selector`
    (`model`, `version`, `tenant`, `key`) on every replica and in Redis."""
    answer: dict[str, Any] = cluster.post(
        "/v1/cache/invalidate", {**selector, "timeout_s": timeout_s}, admin=True
    )
    return answer


def complete(answer: dict[str, Any]) -> bool:
    """Whether every replica applied it, and nothing was rolled back."""
    return not answer.get("missing") and not answer.get("failed") and not answer.get("rolled_back")


def acknowledgements(answer: dict[str, Any], title: str, console: Console) -> None:
    table = Table(title=title)
    table.add_column("replica")
    table.add_column("answer")
    for replica in answer.get("acknowledged", []):
        table.add_row(replica, "[green]acknowledged[/green]")
    for replica in answer.get("missing", []):
        table.add_row(replica, "[yellow]missing (no answer in time)[/yellow]")
    for replica, reason in (answer.get("failed") or {}).items():
        table.add_row(replica, f"[red]failed: {reason}[/red]")
    console.print(table)
    if answer.get("rolled_back"):
        restored = answer.get("restored") or {}
        console.print(
            f"[red]no replica could apply it: version {restored.get('version')} is current "
            f"again (generation {restored.get('generation')})[/red]"
        )
