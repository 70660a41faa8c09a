"""The chaos soak's memory verdict: a process's growth is measured once it settled, and a model
replica settles only once its caches are full, since filling them is growth by design."""

from __future__ import annotations

from benchmarks.chaos_soak import caches_full_at, rss_growth

REPLICA = "ray::ServeReplica:raycache:ModelReplica"


def series(pid: int, process: str, rss: list[tuple[float, float]]) -> list[dict[str, object]]:
    return [{"t": t, "pid": pid, "process": process, "rss_mb": mb} for t, mb in rss]


def test_a_replica_is_full_once_both_its_caches_are_and_the_ingress_once_its_is() -> None:
    fill = [
        {"t": 4.0, "replica": "a", "pid": 7, "result": 0.95, "prefix": 0.5},
        {"t": 6.0, "replica": "a", "pid": 7, "result": 0.97, "prefix": 1.0},
        {"t": 8.0, "replica": "a", "pid": 7, "result": 0.80, "prefix": 1.0},  # stays full
        {"t": 8.0, "replica": "b", "pid": 9, "result": 0.10, "prefix": 1.0},
        {"t": 8.0, "replica": "ingress", "ingress": 1.0},
        {"t": 10.0, "replica": "ingress", "ingress": 0.2},  # after a publish dropped it
    ]
    assert caches_full_at(fill) == {7: 6.0, "ingress": 8.0}


def test_a_replica_settles_when_its_caches_filled_not_at_the_end_of_the_warm_up() -> None:
    # The caches fill until 40 s (RSS +50 MB), then the process is flat.
    rss = [(t, 500.0 + min(t, 40.0) * 1.25) for t in range(0, 122, 2)]
    growth = rss_growth(series(7, REPLICA, rss), warmup_s=20.0, full_at={7: 40.0})
    [row] = growth.values()
    assert row["settled_at_s"] == 40.0
    assert row["change_pct"] == 0.0
    assert row["caches_full_at_s"] == 40.0


def test_a_replica_whose_caches_never_filled_says_so() -> None:
    rss = [(t, 500.0 + t) for t in range(0, 62, 2)]
    [row] = rss_growth(series(7, REPLICA, rss), warmup_s=20.0, full_at={}).values()
    assert row["settled_at_s"] == 20.0
    assert row["change_pct"] > 0
    assert row["caches_full_at_s"] is None


def test_the_ingress_settles_when_its_cache_filled() -> None:
    rss = [(t, 300.0 + min(t, 30.0)) for t in range(0, 62, 2)]
    ingress = series(5, "ray::ServeReplica:raycache:Ingress", rss)
    [row] = rss_growth(ingress, warmup_s=20.0, full_at={"ingress": 30.0, 7: 50.0}).values()
    assert (row["settled_at_s"], row["change_pct"], row["caches_full_at_s"]) == (30.0, 0.0, 30.0)


def test_other_processes_settle_at_the_end_of_the_warm_up() -> None:
    rss = [(t, 100.0) for t in range(0, 62, 2)]
    [row] = rss_growth(series(3, "ray::DirectoryActor", rss), warmup_s=20.0).values()
    assert row["settled_at_s"] == 20.0
    assert "caches_full_at_s" not in row


def test_a_step_at_a_fault_is_told_apart_from_growth_after_the_last_fault() -> None:
    # +20 MB when the new weights load at 100 s, flat after it.
    stepped = [(t, 500.0 + (20.0 if t >= 100 else 0.0)) for t in range(0, 152, 2)]
    # The same, still growing after it.
    growing = [(t, mb + max(t - 100, 0) * 0.5) for t, mb in stepped]
    growth = rss_growth(
        series(7, REPLICA, stepped) + series(8, REPLICA, growing),
        warmup_s=20.0,
        full_at={7: 10.0, 8: 10.0},
        quiet_from=105.0,
    )
    flat, leaking = growth[f"{REPLICA} (7)"], growth[f"{REPLICA} (8)"]
    assert flat["change_pct"] == 4.0
    assert flat["after_faults_pct"] == 0.0
    assert leaking["after_faults_pct"] > 4.0


def test_no_verdict_after_the_faults_when_too_little_time_is_left() -> None:
    rss = [(t, 100.0) for t in range(0, 62, 2)]
    [row] = rss_growth(series(3, REPLICA, rss), warmup_s=20.0, quiet_from=55.0).values()
    assert row["after_faults_pct"] is None
