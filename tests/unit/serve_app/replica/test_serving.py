"""ServingModel's count of requests on one version's weights, against a switch that retires
them from another thread (as the version follower does)."""

from __future__ import annotations

import threading

from cluster.versions.records import ModelVersion
from serve_app.models import TinyGPT, TinyGPTConfig
from serve_app.replica.serving import ServingModel

MODEL = TinyGPT.from_seed(TinyGPTConfig(), seed=0)


def serving(version: str = "1") -> ServingModel:
    record = ModelVersion(model="tiny-gpt", version=version, generation=1, seed=0)
    return ServingModel(MODEL, record)


def test_retired_weights_refuse_new_requests_and_drain_the_ones_in():
    old = serving()
    assert old.enter()
    old.retire()
    assert not old.enter()  # refused, and not counted
    assert not old.wait_drained(0.01)
    old.leave()
    assert old.wait_drained(0.01)


def test_no_request_enters_unseen_while_a_switch_retires_and_drains():
    """Many threads enter and leave while the weights are retired: once `wait_drained` is
    true, no request is on them, and none enters after."""
    old = serving()
    stop = threading.Event()
    late_entries: list[int] = []
    drained = threading.Event()

    def requests() -> None:
        while not stop.is_set():
            if old.enter():
                if drained.is_set():
                    late_entries.append(1)
                old.leave()

    threads = [threading.Thread(target=requests) for _ in range(4)]
    for thread in threads:
        thread.start()
    old.retire()
    assert old.wait_drained(5.0)
    drained.set()
    stop.set()
    for thread in threads:
        thread.join()
    assert late_entries == []
    assert old.inflight == 0
