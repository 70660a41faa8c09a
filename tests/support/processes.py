"""Real servers the tests start and stop themselves: redis-server, and `serve run`."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import redis


def python_output(code: str, env: dict[str, str] | None = None, timeout_s: float = 120) -> str:
    """What `code` prints, run by this Python in a fresh process (one torch thread, and `env`
    over this environment), stripped; raises if it fails."""
    child = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True,
        text=True,
        check=True,
        timeout=timeout_s,
    )
    return child.stdout.strip()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_serve_port: int | None = None


_grpc_port: int | None = None


def serve_http_port() -> int:
    """The HTTP port of the Serve instance this test process starts, whichever test starts it.

    Serve keeps the HTTP options of whoever started it first and ignores later ones, so every
    starter (`serve run` in the end-to-end fixture, `serve.start` in integration tests) must ask
    for the same port; chosen once per process.
    """
    global _serve_port
    if _serve_port is None:
        _serve_port = free_port()
    return _serve_port


_metrics_port: int | None = None


def metrics_export_port() -> int:
    """The port this test process's Ray cluster exports Prometheus metrics on (chosen once)."""
    global _metrics_port
    if _metrics_port is None:
        _metrics_port = free_port()
    return _metrics_port


def serve_grpc_options() -> dict[str, object]:
    """The gRPC options of the Serve instance this test process starts (the same for every
    starter, as `serve_http_port`): the app's servicer on a free port chosen once."""
    global _grpc_port
    if _grpc_port is None:
        _grpc_port = free_port()
    return {
        "port": _grpc_port,
        "grpc_servicer_functions": [
            "serve_app.proto.raycache_pb2_grpc.add_RayCacheServicer_to_server"
        ],
    }


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, step_s: float = 0.1):
    """Poll `condition` until it holds; fail naming `what` after `timeout_s` seconds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(step_s)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


class RedisServer:
    """A private `redis-server` on a free loopback port, keeping nothing on disk."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.workdir = workdir
        self.port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def start(self) -> None:
        """Start (or restart) the server on the same port and wait until it answers PING."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.workdir),
                "--logfile", str(self.workdir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until(self._answers, 10, f"redis-server on port {self.port}")

    def stop(self) -> None:
        """Stop the server and wait for it to exit."""
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None

    def _answers(self) -> bool:
        if self._process is not None and self._process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self._process.returncode}")
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False


class ServeRun:
    """`serve run CONFIG` as a user runs it, against an existing Ray cluster."""

    def __init__(self, config_path: Path, ray_address: str, log_path: Path) -> None:
        self.config_path = config_path
        self.ray_address = ray_address
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # The `serve` CLI installed beside the Python running the tests.
        serve = Path(sys.executable).parent / "serve"
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [str(serve), "run", "--address", self.ray_address, str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                # serve run shuts the application down on SIGINT; make sure it is not ignored.
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )

    def check_alive(self) -> None:
        """Raise with the end of the log if `serve run` has exited."""
        if self._process is not None and self._process.poll() is not None:
            raise RuntimeError(
                f"serve run exited with {self._process.returncode}:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Interrupt `serve run`, which shuts the application down, and wait for it."""
        if self._process is None:
            return
        self._process.send_signal(signal.SIGINT)
        try:
            self._process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None
