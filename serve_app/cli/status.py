"""`raycache status`: the cluster at a glance, from `/healthz`, `/v1/models` and
`/v1/cache/stats`.

`read_status` gathers one document (what `--json` prints); `render_status` draws it as tables:
the cluster (Redis, replicas, auth), the models with their versions and how many replicas serve
each, and every replica's hit ratios per tier.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from serve_app.cli.client import Cluster

TIERS = ("local", "peer", "redis")


def read_status(cluster: Cluster) -> dict[str, Any]:
    """`{"url", "health", "models", "total", "replicas"}` of the running cluster."""
    health = cluster.get("/healthz")
    models = cluster.get("/v1/models")["data"]
    stats = cluster.get("/v1/cache/stats")
    replicas = [
        _replica_row(replica_id, entry)
        for replica_id, entry in sorted(stats.get("replicas", {}).items())
    ]
    for model in models:
        served = [r["versions"].get(model["id"]) for r in replicas]
        model["replicas_on_version"] = sum(1 for v in served if v == model["version"])
    return {
        "url": cluster.url,
        "health": health,
        "models": models,
        "total": _ratios(stats.get("total", {})),
        "replicas": replicas,
    }


def _ratios(entry: dict[str, Any]) -> dict[str, Any]:
    """Hits, misses and the hit ratio overall and per tier, of one stats entry."""
    tiers = entry.get("tiers", {})
    prefix = entry.get("prefix", {})
    queried = int(prefix.get("queried_tokens", 0))
    return {
        "hits": int(entry.get("hits", 0)),
        "misses": int(entry.get("misses", 0)),
        "hit_ratio": float(entry.get("hit_ratio", 0.0)),
        "entries": int(entry.get("entries", 0)),
        "bytes": int(entry.get("bytes", 0)),
        "tier_hits": {tier: int(tiers.get(tier, {}).get("hits", 0)) for tier in TIERS},
        "prefix_token_ratio": int(prefix.get("cached_tokens", 0)) / queried if queried else 0.0,
    }


def _replica_row(replica_id: str, entry: dict[str, Any]) -> dict[str, Any]:
    cluster = entry.get("cluster", {})
    versions = {model: v.get("version") for model, v in cluster.get("versions", {}).items()}
    lagging = sorted(model for model, v in cluster.get("versions", {}).items() if v.get("lagging"))
    return {
        "id": replica_id,
        **_ratios(entry),
        "versions": versions,
        "lagging": lagging,
        "redis_breaker": cluster.get("redis_breaker", "unknown"),
    }


def _percent(ratio: float) -> str:
    return f"{100 * ratio:.1f}%"


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    size = count / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def render_status(status: dict[str, Any], console: Console) -> None:
    health = status["health"]
    overview = Table(title=f"raycache at {status['url']}", show_header=False)
    overview.add_row("status", str(health.get("status")))
    overview.add_row("redis", str(health.get("redis")))
    overview.add_row("replicas", str(health.get("replicas")))
    overview.add_row("tenants", str(health.get("auth")))
    overview.add_row("admin routes", str(health.get("admin")))
    total = status["total"]
    overview.add_row("hit ratio", f"{_percent(total['hit_ratio'])} of {_lookups(total)} lookups")
    overview.add_row("prefix tokens cached", _percent(total["prefix_token_ratio"]))
    console.print(overview)

    models = Table(title="models")
    for column in ("model", "version", "generation", "replicas on it"):
        models.add_column(column)
    replica_count = len(status["replicas"])
    for model in status["models"]:
        models.add_row(
            model["id"],
            str(model["version"]),
            str(model.get("generation", "")),
            f"{model['replicas_on_version']}/{replica_count}",
        )
    console.print(models)

    replicas = Table(title="replicas (hits per tier, local result cache)")
    for column in ("replica", "hit ratio", *TIERS, "misses", "entries", "bytes"):
        replicas.add_column(column, justify="left" if column == "replica" else "right")
    replicas.add_column("breaker")
    replicas.add_column("lagging")
    for row in [*status["replicas"], {"id": "total", **total}]:
        replicas.add_row(
            row["id"],
            _percent(row["hit_ratio"]),
            *[str(row["tier_hits"][tier]) for tier in TIERS],
            str(row["misses"]),
            str(row["entries"]),
            _size(row["bytes"]),
            row.get("redis_breaker", ""),
            ", ".join(row.get("lagging", [])) or ("" if row["id"] == "total" else "-"),
        )
    console.print(replicas)


def _lookups(entry: dict[str, Any]) -> int:
    return int(entry["hits"]) + int(entry["misses"])
