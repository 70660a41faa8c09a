"""The simulator that measures the policies: trace readers, Belady's OPT, the command line.

(`cluster.simulation` and `benchmarks.hit_ratio_report` evaluate `cluster.local.policies`.)
"""

from __future__ import annotations

import gzip
import itertools
import json
import lzma
import random
import struct
from pathlib import Path

import numpy as np
import pytest

from benchmarks.hit_ratio_report import evaluate, largest_drop, parse_readme, run_setting
from cluster.simulation import simulate, traces
from cluster.simulation.opt import next_uses, opt_hits


def brute_force_opt(keys: list[int], capacity: int) -> int:
    """The best hit count over every choice of what to keep (tiny inputs only)."""
    best = 0

    def walk(index: int, cache: frozenset[int], hits: int) -> None:
        nonlocal best
        if index == len(keys):
            best = max(best, hits)
            return
        key = keys[index]
        if key in cache:
            walk(index + 1, cache, hits + 1)
            return
        walk(index + 1, cache, hits)  # do not cache it
        if len(cache) < capacity:
            walk(index + 1, cache | {key}, hits)
        else:
            for victim in cache:
                walk(index + 1, (cache - {victim}) | {key}, hits)

    walk(0, frozenset(), 0)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_opt_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    keys = [rng.randrange(6) for _ in range(14)]
    capacity = rng.randint(1, 3)
    assert opt_hits(np.array(keys, dtype=np.int64), capacity) == brute_force_opt(keys, capacity)


def test_next_uses_points_forward_or_past_the_end() -> None:
    keys = np.array([5, 3, 5, 5, 3, 9], dtype=np.int64)
    assert next_uses(keys).tolist() == [2, 4, 3, 6 + 3, 6 + 4, 6 + 5]


def test_opt_beats_lru_on_a_loop() -> None:
    keys = np.array(list(range(10)) * 50, dtype=np.int64)
    assert opt_hits(keys, 5) > 0
    assert simulate.replay(simulate.make_policy("lru", 5), keys) == 0


def test_readers_detect_every_format(tmp_path: Path) -> None:
    lirs = tmp_path / "x.trace.gz"
    lirs.write_bytes(gzip.compress(b"1\n2\n*\n3\n\n2\n"))
    arc = tmp_path / "x.lis"
    arc.write_text("10 3 0 0\n50 1 0 1\n")
    c2k = tmp_path / "x.trace.xz"
    c2k.write_bytes(lzma.compress(struct.pack(">3i", 7, -2, 7)))
    oracle = tmp_path / "s.oracleGeneral.bin"
    oracle.write_bytes(b"".join(struct.pack("<IQIq", 0, key, 1, -1) for key in (4, 8, 4)))
    text = tmp_path / "keys.txt"
    text.write_text("a\n12\nb\na\n")
    assert traces.load(str(lirs)).tolist() == [1, 2, 3, 2]
    assert traces.load(str(arc)).tolist() == [10, 11, 12, 50]
    assert traces.load(str(c2k)).tolist() == [7, -2, 7]
    assert traces.load(str(oracle)).tolist() == [4, 8, 4]
    assert traces.load(str(text)).tolist() == [-1, 12, -2, -1]
    assert traces.trace_name(str(oracle)) == "s"
    assert traces.trace_name("zipf:0.8") == "zipf0.8"


def test_generators_are_deterministic() -> None:
    first = traces.load("zipf:0.8:1000:5000")
    assert len(first) == 5000
    assert first.tolist() == traces.load("zipf:0.8:1000:5000").tolist()
    assert first.max() < 1000
    looped = itertools.islice(itertools.cycle(range(7)), 20)
    assert traces.load("loop:7:20").tolist() == list(looped)
    mix = traces.load("scan-mix:50000")
    assert len(mix) == 50000 and len(set(mix.tolist())) > 20_000
    with pytest.raises(ValueError, match="unknown trace generator"):
        traces.generate("nope:1")


def test_command_line_writes_the_contracted_json_and_plot(tmp_path: Path) -> None:
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    code = simulate.main(
        [
            "--trace", "loop:30:3000",
            "--capacities", "10,40",
            "--policies", "lru,default,opt",
            "--json", str(out),
            "--plot", str(png),
        ]
    )  # fmt: skip
    assert code == 0
    document = json.loads(out.read_text())
    assert set(document) == {"trace", "requests", "capacities", "hit_ratio_pct"}
    assert document["trace"] == "loop303000"
    assert document["requests"] == 3000
    assert document["capacities"] == [10, 40]
    assert list(document["hit_ratio_pct"]) == ["lru", "default", "opt"]
    assert document["hit_ratio_pct"]["lru"] == [0.0, 99.0]
    assert png.read_bytes().startswith(b"\x89PNG")


def test_default_policy_list_includes_default_and_opt() -> None:
    names = simulate.default_policies()
    assert names[-2:] == ["default", "opt"]
    assert {"lru", "adaptive", "tinylfu", "arc", "sieve", "s3fifo", "lfu"} <= set(names)


def test_report_parses_the_readme_and_flags_violations() -> None:
    readme = """
### demo  (capacities [10, 20])

| policy | 10 | 20 |
|---|---|---|
| LRU | 10.00 | 20.00 |
| ARC | 12.00 | 19.00 |
| OPT(Belady) | 30.00 | 40.00 |
| adaptive W-TinyLFU (theine) | 11.00 | 25.00 |
"""
    (reference,) = parse_readme(readme)
    assert reference.capacities == [10, 20]
    verdict = evaluate(reference, [10.5, 23.5])
    assert verdict["gaps"]["lru"] == [0.5, 3.5]
    assert verdict["gaps"]["best"] == [-1.5, -1.5]
    assert verdict["gaps"]["opt"] == [-19.5, -16.5]
    assert verdict["violations"] == ["demo @ 20: -1.50 vs theine"]


def test_report_runs_a_generated_setting_against_computed_references() -> None:
    assert largest_drop([10.0, 12.0, 11.5, 13.0, 12.9]) == 0.5
    assert largest_drop([1.0, 2.0]) == 0.0
    entry = run_setting("loop:length=50,noise=0.0,requests=3000", [10, 60], {})
    ratios = entry["hit_ratio_pct"]
    assert {"default", "lru", "arc", "tinylfu", "opt"} <= set(ratios)
    assert ratios["lru"] == [0.0, round(100 * (3000 - 50) / 3000, 2)]
    assert entry["gaps"]["lru"] == [
        round(a - b, 2) for a, b in zip(ratios["default"], ratios["lru"], strict=True)
    ]
    assert entry["largest_drop"] == 0.0
