"""Redis set-ups beyond one plain server: ACL users, TLS, a 3-node Redis Cluster, a paused server.

Each is a real `redis-server` (and `redis-cli --cluster create`) on free loopback ports, keeping
nothing on disk; tests start them and must stop them (`stop()` or the context managers).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.processes import RedisServer, free_port, wait_until

ACL_USER = "raycache"
ACL_PASSWORD = "secretpw"
ADMIN_PASSWORD = "adminpw"


class RedisNode(RedisServer):
    """A `RedisServer` with extra command-line arguments, a pid, and SIGSTOP/SIGCONT."""

    def __init__(
        self,
        workdir: Path,
        extra_args: Sequence[str] = (),
        port: int | None = None,
        password: str | None = None,
    ) -> None:
        super().__init__(workdir, port)
        self.extra_args = list(extra_args)
        self.password = password

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password, socket_timeout=2
        )

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.workdir),
                "--logfile", str(self.workdir / f"redis-{self.port}.log"),
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until(self._answers, 10, f"redis-server on port {self.port}")

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("the server is not running")
        return self._process.pid

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """SIGSTOP the server (it accepts TCP connections but never answers), SIGCONT after."""
        os.kill(self.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.pid, signal.SIGCONT)


def acl_server(workdir: Path) -> RedisNode:
    """A started server where `raycache`/`secretpw` may use `raycache:*` keys only and the
    `default` user needs ADMIN_PASSWORD."""
    server = RedisNode(workdir)
    server.start()
    admin = server.client()
    try:
        admin.execute_command(
            "ACL", "SETUSER", ACL_USER, "reset", "on", f">{ACL_PASSWORD}", "~raycache:*", "+@all"
        )
        admin.execute_command("ACL", "SETUSER", "default", "resetpass", f">{ADMIN_PASSWORD}")
    except BaseException:
        server.stop()
        raise
    finally:
        admin.close()
    server.password = ADMIN_PASSWORD
    return server


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """A throwaway CA, and a certificate it signed for 127.0.0.1 and localhost."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(hours=1)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "raycache test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.server_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


class TlsRedisNode(RedisNode):
    """A server that listens for TLS only (`--port 0`), without client certificates."""

    def __init__(self, workdir: Path, files: TlsFiles) -> None:
        super().__init__(workdir)
        self.files = files
        self.extra_args = [
            "--tls-port", str(self.port),
            "--tls-cert-file", str(files.server_cert),
            "--tls-key-file", str(files.server_key),
            "--tls-ca-cert-file", str(files.ca_cert),
            "--tls-auth-clients", "no",
            "--port", "0",  # wins over the plain "--port" before it: no plain-text listener
        ]  # fmt: skip

    @property
    def url(self) -> str:
        query = f"ssl_cert_reqs=required&ssl_ca_certs={self.files.ca_cert}"
        return f"rediss://127.0.0.1:{self.port}/0?{query}"

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            ssl=True,
            ssl_ca_certs=str(self.files.ca_cert),
            socket_timeout=2,
        )


def tls_supported() -> bool:
    """Whether the installed redis-server was built with TLS (it rejects `--tls-port` if not)."""
    binary = shutil.which("redis-server")
    if binary is None:
        return False
    result = subprocess.run(
        [binary, "--tls-port", "0", "--port", "0", "--save", ""],
        capture_output=True,
        text=True,
        timeout=10,
    )
    # Built with TLS, this configuration listens nowhere and exits at once saying so.
    return "not listen anywhere" in result.stdout + result.stderr


class RedisClusterNodes:
    """Three primaries on free ports joined by `redis-cli --cluster create`, no replicas."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.nodes = []
        ports: set[int] = set()
        while len(ports) < 2 * size:  # a client port and a cluster bus port per node
            ports.add(free_port())
        for _ in range(size):
            port, bus_port = ports.pop(), ports.pop()
            node_dir = workdir / f"node-{port}"
            cluster_args = [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-node-timeout", "5000",
                # The bus port defaults to port + 10000, which may be taken or past 65535.
                "--cluster-port", str(bus_port),
            ]  # fmt: skip
            self.nodes.append(RedisNode(node_dir, cluster_args, port=port))

    @property
    def url(self) -> str:
        """A `redis+cluster://` URL seeded with the first node."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> None:
        try:
            for node in self.nodes:
                node.start()
            cli = shutil.which("redis-cli")
            if cli is None:
                raise RuntimeError("redis-cli is not installed")
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            subprocess.run(
                [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0",
                 "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=60,
            )  # fmt: skip
            wait_until(self._ok, 30, "cluster_state:ok on every node", 0.05)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def keys_per_node(self) -> list[int]:
        """DBSIZE of each node."""
        counts = []
        for node in self.nodes:
            client = node.client()
            try:
                counts.append(int(client.dbsize()))
            finally:
                client.close()
        return counts

    def _ok(self) -> bool:
        for node in self.nodes:
            client = node.client()
            try:
                info = client.execute_command("CLUSTER", "INFO")
            finally:
                client.close()
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" not in text:
                return False
        return True
