"""A Ray cluster of two nodes on this machine, as `ray start` builds one on two hosts: a head
and a worker, each with its own CPUs, a resource naming it, and a Serve proxy of its own.

The test process stays connected to its session's one-node cluster (a process holds one Ray
connection), so everything here goes through subprocesses: `ray start`, `serve run`, a driver
script (`run_driver`) for the calls that need a Ray connection, and HTTP to each node's proxy.
The worker's proxy binds its own port (`RAY_SERVE_WORKER_PROXY_HTTP_PORT`), as two hosts'
proxies would each bind the configured one. Stopping kills only this cluster's processes
(found by its session directory and its raylets' resource names), never `ray stop`, which
would stop every Ray cluster on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import httpx

from tests.support.processes import free_port, wait_until

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


class TwoNodeCluster:
    """Head and worker nodes of one Ray cluster, each with `cpus` CPUs (see the module
    docstring). `head_resource` / `worker_resource` name each node (one unit each)."""

    def __init__(self, cpus: int = 2) -> None:
        tag = uuid.uuid4().hex[:8]
        self.head_resource = f"raycache_head_{tag}"
        self.worker_resource = f"raycache_worker_{tag}"
        # Short: Ray's socket paths live under it, and a Unix socket path has ~107 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rc2n-", dir="/tmp"))
        self.gcs_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.head_http_port = free_port()
        self.worker_http_port = free_port()
        self._cpus = cpus
        self._serve: subprocess.Popen[bytes] | None = None

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of this cluster's subprocesses: its token authentication (on by
        default in a local Ray cluster), this checkout on the path, no other cluster's address."""
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_AUTH_MODE"] = "token"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.update(extra)
        return env

    def start(self, worker: bool = True) -> None:
        """Start the head, and the worker unless `worker` is false (a one-node cluster)."""
        common = ["--num-cpus", str(self._cpus), "--disable-usage-stats"]
        self._ray(
            "start", "--head", "--port", str(self.gcs_port), "--temp-dir", str(self.temp_dir),
            "--include-dashboard", "false",
            "--resources", json.dumps({self.head_resource: 1}), *common,
        )  # fmt: skip
        if not worker:
            return
        self._ray(
            "start", "--address", self.address,
            "--resources", json.dumps({self.worker_resource: 1}), *common,
            env=self.env(RAY_SERVE_WORKER_PROXY_HTTP_PORT=str(self.worker_http_port)),
        )  # fmt: skip

    def serve_run(self, config_path: Path, log_path: Path) -> None:
        """`serve run` of `config_path` on this cluster (in the background)."""
        with log_path.open("wb") as log:
            self._serve = subprocess.Popen(
                [str(BIN / "serve"), "run", "--address", self.address, str(config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(),
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )

    def run_driver(self, script: str, timeout_s: float = 120) -> Any:
        """Run `script` (Python) connected to this cluster; it prints one JSON value last,
        which is returned."""
        prelude = f"import ray\nray.init(address={self.address!r}, log_to_driver=False)\n"
        done = subprocess.run(
            [sys.executable, "-c", prelude + script],
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout_s,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"driver failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def kill_worker_node(self) -> None:
        """Kill the worker node's raylet, as a lost host would vanish; its workers follow."""
        for pid in self._pids(self.worker_resource, "raylet"):
            os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        if self._serve is not None and self._serve.poll() is None:
            self._serve.send_signal(signal.SIGINT)
            try:
                self._serve.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._serve.kill()
        ours = {
            pid
            for marker in (self.worker_resource, self.head_resource, str(self.temp_dir))
            for pid in self._pids(marker)
        }
        # The raylets' agents retitle themselves (`ray::DashboardAgent`) and outlive a killed
        # raylet: found as its children, before it goes.
        for pid in ours | _descendants(ours):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not self._pids(str(self.temp_dir)), 30, "the two nodes to stop", 0.5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _ray(self, *args: str, env: dict[str, str] | None = None) -> None:
        done = subprocess.run(
            [str(BIN / "ray"), *args],
            capture_output=True,
            text=True,
            env=env or self.env(),
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"ray {args[0]} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")

    def _pids(self, marker: str, name: str = "") -> list[int]:
        """Processes whose command line holds `marker` (and `name`), but never this one."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmdline and name in cmdline:
                found.append(int(entry.name))
        return found


def _descendants(parents: set[int]) -> set[int]:
    """Every process below `parents` in the process tree."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    todo = list(parents)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def wait_for_http(url: str, timeout_s: float) -> None:
    """Wait until `url`'s `/healthz` answers 200."""

    def up() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, timeout_s, url, 1.0)
