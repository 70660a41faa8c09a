"""The requests of a bench run: repeat ratios, traces, and prompts no other run has asked."""

from __future__ import annotations

import pytest

from serve_app.cli.workload import repeat_workload, trace_workload


def _prompts(calls):
    return [call.body["prompt"] for call in calls]


@pytest.mark.parametrize("repeat", [0.0, 0.35, 0.8])
def test_a_share_of_repeat_requests_repeats_an_earlier_prompt(repeat):
    prompts = _prompts(repeat_workload(2000, repeat, "run", "m", 8))
    repeats = len(prompts) - len(set(prompts))
    assert abs(repeats / len(prompts) - repeat) < 0.04


def test_no_repeats_means_every_prompt_is_new():
    prompts = _prompts(repeat_workload(300, 0.0, "run", "m", 8))
    assert len(set(prompts)) == 300


def test_a_repeat_is_the_very_same_request():
    calls = repeat_workload(200, 0.5, "run", "m", 8, seed=3)
    by_prompt = {}
    for call in calls:
        assert by_prompt.setdefault(call.body["prompt"], call.body) == call.body
    assert calls[0].body["temperature"] == 0 and calls[0].body["max_tokens"] == 8


def test_runs_share_no_prompt_and_a_run_is_reproducible():
    first = _prompts(repeat_workload(100, 0.5, "aaaa", "m", 8))
    assert not set(first) & set(_prompts(repeat_workload(100, 0.5, "bbbb", "m", 8)))
    assert first == _prompts(repeat_workload(100, 0.5, "aaaa", "m", 8))


def test_a_trace_asks_one_prompt_per_key_in_its_order():
    calls = trace_workload("loop:3:7", 5, "run", "m", 4)
    prompts = _prompts(calls)
    assert len(prompts) == 5
    assert prompts[0] == prompts[3] and prompts[1] == prompts[4]
    assert len(set(prompts[:3])) == 3


def test_a_repeat_ratio_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="between 0 and 1"):
        repeat_workload(10, 1.5, "run", "m", 8)
