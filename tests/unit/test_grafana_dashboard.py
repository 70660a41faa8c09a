"""k8s/grafana/raycache-dashboard.json imports into Grafana as it is, and every query names
metrics that raycache exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from cluster.versions.actor import RolloutMetrics
from serve_app.api.request_metrics import RequestMetrics
from serve_app.replica.metrics import ReplicaMetrics
from tests.unit.serve_app.replica.test_metrics import Recorded

BOARD = Path(__file__).resolve().parents[2] / "k8s" / "grafana" / "raycache-dashboard.json"
PANEL_TYPES = {"timeseries", "stat", "gauge", "bargauge", "table", "heatmap"}
METRIC = re.compile(r"\bray_raycache_[a-z_]+\b")


def board() -> dict:
    return json.loads(BOARD.read_text())


def exported_names() -> set[str]:
    """Every series name Ray exports for raycache's metrics (counters get `_total`,
    histograms `_bucket`, `_count` and `_sum`)."""
    backend = Recorded()
    kinds: dict[str, str] = {}
    for kind in ("Counter", "Gauge", "Histogram"):
        original = getattr(backend, kind)

        def make(*args, _original=original, _kind=kind, **kwargs):
            kinds[args[0]] = _kind
            return _original(*args, **kwargs)

        setattr(backend, kind, make)
    ReplicaMetrics(backend)
    RequestMetrics(backend)
    RolloutMetrics(backend)
    suffixes = {"Counter": ("_total",), "Gauge": ("",), "Histogram": ("_bucket", "_count", "_sum")}
    return {f"ray_{name}{s}" for name, kind in kinds.items() for s in suffixes[kind]}


def dashboard_metrics() -> set[str]:
    return {
        name
        for panel in board()["panels"]
        for t in panel["targets"]
        for name in METRIC.findall(t["expr"])
    }


def test_the_board_has_the_shape_grafana_imports() -> None:
    data = board()
    assert data["title"] and data["uid"] and isinstance(data["schemaVersion"], int)
    (variable,) = data["templating"]["list"]
    assert (variable["name"], variable["type"], variable["query"]) == (
        "datasource",
        "datasource",
        "prometheus",
    )
    ids = [panel["id"] for panel in data["panels"]]
    assert len(ids) == len(set(ids))
    for panel in data["panels"]:
        assert panel["type"] in PANEL_TYPES and panel["title"]
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y"))
        assert grid["x"] + grid["w"] <= 24
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")")


def test_every_query_names_metrics_raycache_exports() -> None:
    assert dashboard_metrics() <= exported_names()
    # What the issue asks the board to show.
    for needed in (
        "ray_raycache_result_cache_hits_total",
        "ray_raycache_prefix_cache_hits_total",
        "ray_raycache_request_duration_seconds_bucket",
        "ray_raycache_result_cache_bytes",
        "ray_raycache_result_cache_evictions_total",
        "ray_raycache_redis_breaker_state",
        "ray_raycache_version_lagging",
        "ray_raycache_result_fetch_seconds_bucket",
        "ray_raycache_prefix_fetch_seconds_bucket",
        "ray_raycache_version_rollout_seconds_bucket",
    ):
        assert needed in dashboard_metrics()
