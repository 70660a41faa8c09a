"""The `raycache` command against the test cluster: each command, its JSON, its tables, its
one-line failures and their exit codes (`serve_app.cli.errors.ExitCode`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from serve_app.cli.errors import ExitCode
from serve_app.cli.main import app
from tests.conftest import ADMIN_TOKEN, API_KEYS
from tests.support.processes import free_port

pytestmark = pytest.mark.e2e

MODEL = "tiny-gpt"


@pytest.fixture
def raycache(running_app):
    """Run `raycache ARGS...` in this process against the test cluster, as tenant alice."""
    runner = CliRunner()
    environment = {
        "RAYCACHE_URL": running_app.url,
        "RAYCACHE_API_KEY": API_KEYS["alice"],
        "RAYCACHE_ADMIN_TOKEN": ADMIN_TOKEN,
    }

    def run(*args: str, **overrides: str | None):
        return runner.invoke(app, list(args), env={**environment, **overrides})

    return run


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _one_line_error(result, code: ExitCode, *words: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raycache: error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_the_console_script_is_installed():
    assert shutil.which("raycache"), "pip install -e . installs the raycache command"
    result = subprocess.run(["raycache", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("status", "publish", "invalidate", "warm", "bench", "simulate"):
        assert command in result.stdout


def test_status_shows_models_replicas_redis_and_hit_ratios(raycache, running_app):
    document = _json(raycache("status", "--json"))
    assert document["health"]["redis"] == "up"
    assert len(document["replicas"]) == running_app.replica_count()
    models = {model["id"]: model for model in document["models"]}
    assert set(models) == {"tiny-gpt", "tiny-embed"}
    assert models[MODEL]["replicas_on_version"] == running_app.replica_count()
    for replica in document["replicas"]:
        assert set(replica["tier_hits"]) == {"local", "peer", "redis"}
        assert 0.0 <= replica["hit_ratio"] <= 1.0

    table = raycache("status")
    assert table.exit_code == 0, table.output
    for text in ("tiny-gpt", "tiny-embed", "redis", "hit ratio", "total"):
        assert text in table.stdout


def test_publish_prints_who_acknowledged(raycache, running_app):
    current = {m["id"]: m for m in _json(raycache("status", "--json"))["models"]}[MODEL]
    seed = next(m["seed"] for m in running_app.app_args()["models"] if m["id"] == MODEL)
    # The version in use again, with its own weights: every replica acknowledges, none changes.
    answer = _json(raycache("publish", MODEL, current["version"], "--seed", str(seed), "--json"))
    assert len(answer["acknowledged"]) == running_app.subscriber_count()
    assert not answer["missing"] and not answer["failed"]

    table = raycache("publish", MODEL, current["version"], "--seed", str(seed))
    assert table.exit_code == 0, table.output
    assert table.stdout.count("acknowledged") == running_app.subscriber_count()


def test_publish_failures_are_one_line_with_their_exit_code(raycache):
    _one_line_error(
        raycache("publish", MODEL, "1", "--seed", "1", RAYCACHE_ADMIN_TOKEN=None),
        ExitCode.CREDENTIALS,
        "RAYCACHE_ADMIN_TOKEN",
    )
    _one_line_error(
        raycache("publish", MODEL, "1", "--seed", "1", RAYCACHE_ADMIN_TOKEN="wrong-token"),
        ExitCode.CREDENTIALS,
        "401",
    )
    _one_line_error(
        raycache("publish", "no-such-model", "2", "--seed", "1"), ExitCode.REFUSED, "model"
    )
    _one_line_error(raycache("publish", MODEL, "2"), ExitCode.USAGE, "--seed")
    _one_line_error(
        raycache("status", "--url", f"http://127.0.0.1:{free_port()}"),
        ExitCode.UNREACHABLE,
        "cannot reach",
    )


def test_invalidate_drops_an_answer_everywhere(raycache, running_app):
    prompt = {"model": MODEL, "prompt": f"cli {uuid.uuid4()}", "max_tokens": 4, "temperature": 0}
    with running_app.http() as http:
        key = http.post("/v1/completions", json=prompt).json()["cache"]["key"]
        assert http.post("/v1/completions", json=prompt).json()["cache"]["hit"]
        answer = _json(raycache("invalidate", "--key", key, "--json"))
        assert len(answer["acknowledged"]) == running_app.subscriber_count()
        assert not http.post("/v1/completions", json=prompt).json()["cache"]["hit"]
    _one_line_error(raycache("invalidate"), ExitCode.USAGE, "--key")
    _one_line_error(raycache("invalidate", "--key", "not-hex"), ExitCode.REFUSED, "key")


def test_warm_caches_prompts_and_transcripts(raycache, tmp_path: Path):
    tag = uuid.uuid4().hex
    lines = [
        json.dumps(f"warm prompt one {tag}"),
        json.dumps({"prompt": f"warm prompt two {tag}", "max_tokens": 4}),
        "# a comment, then a blank line",
        "",
        json.dumps({"messages": [{"role": "user", "content": f"warm chat {tag}"}]}),
    ]
    file = tmp_path / "warm.jsonl"
    file.write_text("\n".join(lines) + "\n")

    first = _json(raycache("warm", str(file), "--rate", "50", "--json"))
    assert first["requests"] == 3 and first["misses"] == 3 and first["failed"] == 0
    assert first["tokens_cached"] > 0
    second = _json(raycache("warm", str(file), "--rate", "50", "--json"))
    assert sum(second["hits"].values()) == 3 and second["misses"] == 0

    table = raycache("warm", str(file))
    assert table.exit_code == 0, table.output
    assert "3 sent" in table.stdout and "0 failed" in table.stdout

    file.write_text(json.dumps("fine") + "\n{not json\n")
    _one_line_error(raycache("warm", str(file)), ExitCode.USAGE, f"{file}:2")


def test_bench_reports_and_plots_throughput_and_latency_with_and_without_hits(
    raycache, tmp_path: Path
):
    out = tmp_path / "bench"
    result = raycache(
        "bench",
        "--requests",
        "30",
        "--repeat",
        "0.5",
        "--concurrency",
        "2",
        "--warmup",
        "2",
        "--out",
        str(out),
        "--json",
    )
    report = _json(result)
    baseline, workload = report["baseline"]["summary"], report["workload"]["summary"]
    assert baseline["requests"] == workload["requests"] == 30
    assert baseline["failed"] == workload["failed"] == 0
    assert baseline["hit_ratio"] == 0.0  # new prompts only
    assert workload["hit_ratio"] > 0.2  # about half repeat an earlier prompt
    assert {"hits", "miss"} <= set(workload["outcomes"])
    assert report["comparison"]["throughput_x"] > 0
    names = {Path(path).name for path in report["files"]}
    assert names == {"throughput.png", "latency.png", "hit_ratio.png", "bench.json"}
    for path in report["files"]:
        assert Path(path).stat().st_size > 0
        if path.endswith(".png"):
            assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / report["config"]["run_id"] / "bench.json").read_text())["workload"]

    table = raycache(
        "bench",
        "--requests",
        "10",
        "--trace",
        "zipf:1.0:5:10",
        "--no-baseline",
        "--warmup",
        "0",
        "--out",
        str(out),
    )
    assert table.exit_code == 0, table.output
    for text in ("workload", "req/s", "p50 ms", "hit ratio", "throughput.png"):
        assert text in table.stdout
