"""What the benchmarks that measure over HTTP start: a private redis-server and a private Ray
cluster with one `serve run` on it.

- `RedisServer(workdir)`: redis-server on a free loopback port, keeping nothing on disk; it can
  be stopped, killed and started again on the same port, and paused with signals.
- `serve_cluster(config, workdir, env, ready)`: starts Ray locally (4 logical CPUs: the
  applications' fractional CPUs on however many cores the machine has; its files under
  `workdir`), runs `serve run` of `config` with its HTTP port set to a free one, and yields the
  URL once `ready(client)` holds; on leaving it stops `serve run` and Ray and restores the
  environment. `env` is set in this process's environment first: the replicas inherit it from
  the raylet this process starts.
- `latency_summary(seconds)`: the median and p90 of request latencies, in milliseconds.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import redis
import yaml

ROOT = Path(__file__).resolve().parents[1]
STARTUP_S = 300.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A private redis-server on a free loopback port, keeping nothing on disk; with
    `maxmemory_mb`, bounded and evicting keys with a TTL (`volatile-lru`, as k8s/redis.yaml)."""

    def __init__(self, workdir: Path, maxmemory_mb: int | None = None) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._workdir = workdir
        self._maxmemory_mb = maxmemory_mb
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        """Start redis-server (again, empty, after `kill`) and wait until it answers."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (apt-get install redis-server)")
        limits = []
        if self._maxmemory_mb is not None:
            limits = [
                "--maxmemory",
                f"{self._maxmemory_mb}mb",
                "--maxmemory-policy",
                "volatile-lru",
            ]
        self.process = subprocess.Popen(
            [
                binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self._workdir),
                "--logfile", str(self._workdir / "redis.log"), *limits,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"redis-server exited with {self.process.returncode}")
            try:
                if client.ping():
                    return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"redis-server on port {self.port} did not answer") from None
                time.sleep(0.05)

    def signal(self, number: int) -> None:
        """Send `number` to redis-server (SIGSTOP freezes it, SIGCONT thaws it)."""
        assert self.process is not None
        self.process.send_signal(number)

    def kill(self) -> None:
        """Kill redis-server at once (its data is gone: it keeps nothing on disk)."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        """Stop redis-server, thawing it first if it was frozen."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            self.process.wait(timeout=10)


def stop_serve(process: subprocess.Popen[bytes]) -> None:
    """Interrupt `serve run` (it deletes its applications) and wait for it."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def serve_cluster(
    config: dict[str, Any],
    workdir: Path,
    env: dict[str, str],
    ready: Callable[[httpx.Client], bool],
    log_path: Path | None = None,
) -> Iterator[str]:
    """The URL of `config` served by `serve run` on a private Ray cluster (module docstring);
    `serve run`'s output goes to `log_path` (default: `workdir/serve-run.log`)."""
    import ray

    saved = dict(os.environ)
    for name in ("RAYCACHE_API_KEYS", "RAYCACHE_ADMIN_TOKEN", "RAY_ADDRESS"):
        os.environ.pop(name, None)
    os.environ.update(env)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), saved.get("PYTHONPATH")]))
    process = None
    try:
        context = ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            namespace="raycache-bench",
            _temp_dir=str(workdir / "ray"),
        )
        port = free_port()
        served = copy.deepcopy(config)
        served["http_options"] = {
            **served.get("http_options", {}),
            "host": "127.0.0.1",
            "port": port,
        }
        served.pop("grpc_options", None)
        path = workdir / "serve.yaml"
        path.write_text(yaml.safe_dump(served, sort_keys=False))
        url = f"http://127.0.0.1:{port}"
        log = log_path or workdir / "serve-run.log"
        process = _serve_run(path, context.address_info["gcs_address"], url, log, ready)
        yield url
    finally:
        if process is not None:
            stop_serve(process)
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)


def _serve_run(
    path: Path,
    gcs_address: str,
    url: str,
    log_path: Path,
    ready: Callable[[httpx.Client], bool],
) -> subprocess.Popen[bytes]:
    """`serve run` of `path`, returned once `ready` holds; its output goes to `log_path`."""
    serve = Path(sys.executable).parent / "serve"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(serve), "run", "--address", gcs_address, str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    deadline = time.monotonic() + STARTUP_S
    with httpx.Client(base_url=url, timeout=10) as client:
        while True:
            if process.poll() is not None:
                raise SystemExit(f"serve run exited with {process.returncode}; see {log_path}")
            if time.monotonic() > deadline:
                stop_serve(process)
                raise SystemExit(f"the applications were not up within {STARTUP_S:.0f} s")
            try:
                if ready(client):
                    return process
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)


def latency_summary(seconds: list[float]) -> dict[str, float]:
    """The median and p90 (milliseconds) of request latencies given in `seconds`, and how many."""
    ordered = sorted(seconds)
    return {
        "median_ms": 1000 * statistics.median(ordered),
        "p90_ms": 1000 * ordered[int(0.9 * (len(ordered) - 1))],
        "requests": len(ordered),
    }
