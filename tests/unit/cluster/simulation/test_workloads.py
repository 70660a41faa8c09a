"""The generated workload families: seeded, shaped as their docstrings say, and reachable as
trace specs."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.simulation import traces, workloads


@pytest.mark.parametrize("family", sorted(workloads.FAMILIES))
def test_every_family_is_seeded_and_sized(family: str) -> None:
    make = workloads.FAMILIES[family]
    first = make(5_000, seed=2)
    assert first.dtype == np.int64 and len(first) == 5_000
    assert np.array_equal(first, make(5_000, seed=2))
    assert not np.array_equal(first, make(5_000, seed=3))


def test_chat_sends_the_hot_share_to_the_prompts_and_abandons_sessions() -> None:
    keys = workloads.chat(50_000, hot=0.2, prompts=10, turns=5, keys=3, window=200, seed=1)
    prompts = keys < 10
    assert 0.18 < prompts.mean() < 0.22
    sessions = keys[~prompts]
    # A session's keys are its id times `keys` plus 0..2: the last sighting of each session
    # comes soon after its first, since sessions run about `window` requests side by side.
    ids = (sessions - sessions.min()) // 3
    first = {}
    last = {}
    for position, session in enumerate(ids.tolist()):
        first.setdefault(session, position)
        last[session] = position
    spans = [last[session] - first[session] for session in first]
    assert np.percentile(spans, 99) < 2_000
    assert len(first) > 5_000  # many sessions, each short


def test_phase_moves_to_new_keys_and_cycles_through_sets() -> None:
    fresh = workloads.phase(4_000, keys=500, phase=1_000)
    assert not set(fresh[:1_000].tolist()) & set(fresh[1_000:2_000].tolist())
    cycled = workloads.phase(4_000, keys=500, phase=1_000, sets=2)
    key_set = cycled // (1 << 40)  # each key set has its own id range
    assert key_set[:1_000].tolist() == key_set[2_000:3_000].tolist() == [0] * 1_000
    assert key_set[1_000:2_000].tolist() == [1] * 1_000


def test_scan_keys_are_never_repeated() -> None:
    keys = workloads.scan(30_000, hot=1_000, length=500, every=2_000)
    scanned = keys[keys >= 1_000]
    assert len(scanned) == len(set(scanned.tolist())) > 0
    assert keys[2_000:2_500].min() >= 1_000


def test_loop_without_noise_cycles() -> None:
    keys = workloads.loop(1_000, length=7, noise=0.0)
    assert set(keys.tolist()) == set(range(7))
    assert all(keys[i + 1] == (keys[i] + 1) % 7 for i in range(999))


def test_trend_introduces_new_keys_as_it_drifts() -> None:
    keys = workloads.trend(20_000, keys=1_000, speed=0.1)
    early, late = set(keys[:2_000].tolist()), set(keys[-2_000:].tolist())
    assert late - early
    assert np.median(keys[-2_000:]) < np.median(keys[:2_000])


def test_specs_reach_the_families_through_traces() -> None:
    keys = traces.load("chat:requests=3000,hot=0.5,seed=4")
    assert np.array_equal(keys, workloads.chat(3_000, hot=0.5, seed=4))
    assert traces.trace_name("chat:hot=0.5,turns=4") == "chathot=0.5_turns=4"
    assert traces.load("loop:5:12").tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert len(traces.load("loop:length=5,requests=12")) == 12
    with pytest.raises(ValueError, match="NAME=VALUE"):
        workloads.generate("chat:0.5")
    with pytest.raises(ValueError, match="bad parameters"):
        workloads.generate("trend:nope=1")
    with pytest.raises(ValueError, match="unknown workload family"):
        workloads.parse("nope:")
