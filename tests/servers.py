"""Throwaway Redis and PostgreSQL servers for tests.

Integration tests need real servers they can kill, restart and inspect, and
they must never touch a developer's or CI machine's own instances.  Each class
here owns a private server in a fresh temporary directory on a free port.
Nothing is registered globally: callers (usually pytest fixtures) must call
``close()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import ipaddress
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from psycopg2.sql import Composable

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
LOG_TAIL_LINES = 30


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    The kernel picks it, so parallel test runs do not collide on fixed ports.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """Return the end of a server log so start failures explain themselves."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<no log at {path}: {exc}>"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else "<log is empty>"


def _find_binary(name: str, *, package: str) -> str:
    """Path of a server tool on PATH, or a RuntimeError saying which package installs it."""
    binary = shutil.which(name)
    if binary is None:
        raise RuntimeError(f"{name} not found on PATH; install the Debian package '{package}'")
    return binary


class RedisReplyError(Exception):
    """An error reply (``-ERR ...``) from Redis, raised by ``RedisServer.command``."""


class _RespReader:
    """Minimal RESP2 reply parser; enough for the admin commands tests need."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def _line(self) -> bytes:
        line = self._stream.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError(f"connection closed mid-reply: {line!r}")
        return line[:-2]

    def read(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisReplyError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            length = int(rest)
            if length < 0:
                return None
            data = self._stream.read(length + 2)
            if len(data) != length + 2:
                raise ConnectionError("connection closed mid-bulk-string")
            return data[:-2].decode(errors="replace")
        if kind == b"*":
            count = int(rest)
            if count < 0:
                return None
            return [self.read() for _ in range(count)]
        raise ValueError(f"unexpected RESP reply: {line!r}")


def _encode_command(args: Sequence[Any]) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _write_tls_material(
    directory: Path, names: tuple[str, ...] = ("localhost", "127.0.0.1")
) -> dict[str, Path]:
    """Create a throwaway CA plus server and client certificates.

    TLS tests need a chain that verifies against a known CA, with SANs for
    both ``localhost`` and ``127.0.0.1``, without depending on openssl(1).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    not_before = now - datetime.timedelta(days=1)
    not_after = now + datetime.timedelta(days=30)

    def name(common_name: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "chatserver tests"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("chatserver test CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value

    def leaf(
        common_name: str, sans: list[x509.GeneralName], usage: x509.ObjectIdentifier
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(common_name))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), False
            )
            .sign(ca_key, hashes.SHA256())
        )
        return key, cert

    def san(name: str) -> x509.GeneralName:
        try:
            return x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            return x509.DNSName(name)

    server_key, server_cert = leaf(
        names[0],
        [san(n) for n in names],
        ExtendedKeyUsageOID.SERVER_AUTH,
    )
    client_key, client_cert = leaf(
        "chatserver test client",
        [x509.DNSName("client.localhost")],
        ExtendedKeyUsageOID.CLIENT_AUTH,
    )

    paths = {
        "ca_file": directory / "ca.pem",
        "cert_file": directory / "server.pem",
        "key_file": directory / "server.key",
        "client_cert_file": directory / "client.pem",
        "client_key_file": directory / "client.key",
    }
    pem = serialization.Encoding.PEM
    paths["ca_file"].write_bytes(ca_cert.public_bytes(pem))
    paths["cert_file"].write_bytes(server_cert.public_bytes(pem))
    write_key(server_key, paths["key_file"])
    paths["client_cert_file"].write_bytes(client_cert.public_bytes(pem))
    write_key(client_key, paths["client_key_file"])
    return paths


class RedisServer:
    """A private ``redis-server`` on 127.0.0.1 that tests may kill and restart.

    Persistence is off (``--save '' --appendonly no``) so restarts come back
    empty, like a crashed broker would for pub/sub purposes.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        *,
        password: str | None = None,
        tls: bool = False,
        tls_names: tuple[str, ...] = ("localhost", "127.0.0.1"),
    ) -> None:
        self.binary = _find_binary("redis-server", package="redis-server")
        self.password = password
        self.tls = tls
        self.tls_names = tls_names
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="chatserver-redis-"))
        self.log_file = self.dir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._closed = False
        self.ca_file: str | None = None
        self.cert_file: str | None = None
        self.key_file: str | None = None
        self.client_cert_file: str | None = None
        self.client_key_file: str | None = None
        if tls:
            # tls_names: what the server certificate is valid for.
            for attr, path in _write_tls_material(self.dir, tls_names).items():
                setattr(self, attr, str(path))

    @property
    def url(self) -> str:
        """Connection URL; ``rediss://localhost`` under TLS so the host name verifies."""
        auth = f":{urllib.parse.quote(self.password, safe='')}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}localhost:{self.port}/0"
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        """Whether our child process is alive, so tests can assert a kill took effect."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id while running, for tests that signal the server themselves."""
        return self._proc.pid if self.running and self._proc else None

    def _argv(self) -> list[str]:
        argv = [
            self.binary,
            "--bind",
            self.host,
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            "",
        ]
        if self.password:
            argv += ["--requirepass", self.password]
        if self.tls:
            assert self.cert_file and self.key_file and self.ca_file
            argv += [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                self.cert_file,
                "--tls-key-file",
                self.key_file,
                "--tls-ca-cert-file",
                self.ca_file,
                "--tls-auth-clients",
                "optional",
            ]
        else:
            argv += ["--port", str(self.port)]
        return argv

    def ssl_context(self, *, client_cert: bool = False) -> ssl.SSLContext:
        """Client context trusting the throwaway CA, optionally presenting the client cert."""
        if not self.tls or self.ca_file is None:
            raise RuntimeError("this RedisServer was not started with tls=True")
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if client_cert:
            assert self.client_cert_file and self.client_key_file
            ctx.load_cert_chain(self.client_cert_file, self.client_key_file)
        return ctx

    def connect(self, timeout: float = 5.0) -> socket.socket:
        """Open a raw (TLS-wrapped if needed) socket to the server."""
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        if self.tls:
            try:
                # Verify against the first name the certificate was made for.
                return self.ssl_context().wrap_socket(sock, server_hostname=self.tls_names[0])
            except BaseException:
                sock.close()
                raise
        return sock

    def _ping_once(self) -> bool:
        try:
            with self.connect(timeout=1.0) as sock:
                stream = sock.makefile("rb")
                if self.password:
                    sock.sendall(_encode_command(["AUTH", self.password]))
                    if not stream.readline().startswith(b"+OK"):
                        return False
                sock.sendall(b"PING\r\n")
                return stream.readline().startswith(b"+PONG")
        except (OSError, ssl.SSLError):
            return False

    def start(self) -> None:
        """Start the server and block until it answers PING (bounded wait)."""
        if self._closed:
            raise RuntimeError("RedisServer is closed")
        if self.running:
            return
        with open(self.log_file, "ab") as log:
            self._proc = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise RuntimeError(
                    f"redis-server exited with code {code} during startup on port "
                    f"{self.port}; log tail:\n{_log_tail(self.log_file)}"
                )
            if self._ping_once():
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(
            f"redis-server did not answer PING on port {self.port} within "
            f"{START_TIMEOUT:.0f}s; log tail:\n{_log_tail(self.log_file)}"
        )

    def stop(self) -> None:
        """Stop gracefully (SIGTERM), falling back to SIGKILL if it hangs."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)

    def kill(self) -> None:
        """Simulate a crash: SIGKILL and wait until the process is gone."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT)

    def restart(self) -> None:
        """Start again on the same port, e.g. after ``kill()`` to test reconnects."""
        self.stop()
        self.start()

    def command(self, *args: Any) -> Any:
        """Run one command on a fresh blocking connection and return the parsed reply.

        Error replies raise ``RedisReplyError``.  Bulk strings are decoded to
        ``str``.  Note the helper's own connection shows up in ``CLIENT LIST``.
        """
        with self.connect() as sock:
            reader = _RespReader(sock.makefile("rb"))
            if self.password:
                sock.sendall(_encode_command(["AUTH", self.password]))
                reader.read()
            sock.sendall(_encode_command(args))
            return reader.read()

    def close(self) -> None:
        """Kill the server if running and delete its directory; idempotent."""
        if self._closed:
            return
        self._closed = True
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


CLUSTER_SLOTS = 16384
CLUSTER_SETTLE_TIMEOUT = 15.0
CLUSTER_CREATE_TIMEOUT = 30.0


@dataclasses.dataclass(frozen=True)
class ClusterMaster:
    """A master and the slot ranges (inclusive ``(start, end)`` pairs) it serves."""

    port: int
    slots: tuple[tuple[int, int], ...]

    def owns(self, slot: int) -> bool:
        return any(start <= slot <= end for start, end in self.slots)


class RedisClusterNode(RedisServer):
    """One ``redis-server`` of a ``RedisCluster``, in its own directory.

    ``nodes.conf`` lives in that directory, so ``restart()`` brings the node
    back with its cluster identity.  The cluster bus gets a port of its own
    (``--cluster-port``) because client port + 10000 may be taken or > 65535.
    With ``tls_files`` (one CA for the whole cluster) clients, replication and
    the cluster bus all speak TLS; a ``password`` is also the one replicas
    use to reach their master.
    """

    def __init__(
        self,
        *,
        node_timeout_ms: int,
        taken: set[int],
        password: str | None = None,
        tls_files: dict[str, Path] | None = None,
    ) -> None:
        super().__init__(password=password)
        if tls_files:
            self.tls = True
            for attr, path in tls_files.items():
                setattr(self, attr, str(path))
        while self.port in taken:
            self.port = free_port()
        taken.add(self.port)
        self.bus_port = free_port()
        while self.bus_port in taken:
            self.bus_port = free_port()
        taken.add(self.bus_port)
        self.node_timeout_ms = node_timeout_ms

    def _argv(self) -> list[str]:
        argv = [
            *super()._argv(),
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-port",
            str(self.bus_port),
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
            # Replicas may always take over, however long since they heard
            # from their master: failover tests must not depend on timing.
            "--cluster-replica-validity-factor",
            "0",
            # Replicas sync as soon as they connect (the default waits 5 s
            # for more replicas to share one diskless transfer).
            "--repl-diskless-sync-delay",
            "0",
        ]
        if self.password:
            argv += ["--masterauth", self.password]
        if self.tls:
            assert self.client_cert_file and self.client_key_file
            argv += ["--tls-cluster", "yes", "--tls-replication", "yes"]
            # Towards other nodes (bus, replication) a node is the client: its
            # server certificate is not good for that.
            argv += ["--tls-client-cert-file", self.client_cert_file]
            argv += ["--tls-client-key-file", self.client_key_file]
        return argv

    def _role(self) -> list[Any] | None:
        if not self.running:
            return None
        try:
            reply = self.command("ROLE")
        except (OSError, ConnectionError, RedisReplyError):
            return None
        return reply if isinstance(reply, list) else None

    @property
    def role(self) -> str | None:
        """``"master"`` or ``"slave"`` as the node says now; None if it is down."""
        reply = self._role()
        return str(reply[0]) if reply else None

    @property
    def replica_of(self) -> int | None:
        """Port of this node's master if it is a replica, else None."""
        reply = self._role()
        if reply and reply[0] == "slave":
            return int(reply[2])
        return None

    @property
    def node_id(self) -> str:
        return str(self.command("CLUSTER", "MYID"))

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "down"
        return f"<RedisClusterNode port {self.port} {state}>"


class ShardSubscriber:
    """A raw connection in subscribed mode that reads ``smessage`` pushes.

    ``ssubscribe`` raises ``RedisReplyError`` (e.g. ``MOVED 1234 host:port``)
    when the node refuses.  A read that times out leaves the stream unusable:
    close the subscriber afterwards.
    """

    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._reader = _RespReader(self._sock.makefile("rb"))

    def ssubscribe(self, *channels: str) -> list[Any]:
        """Subscribe; return the confirmations (``["ssubscribe", ch, count]`` each)."""
        self._sock.sendall(_encode_command(["SSUBSCRIBE", *channels]))
        return [self._reader.read() for _ in channels]

    def next_push(self, timeout: float = 5.0) -> Any:
        """The next push, e.g. ``["smessage", channel, payload]``; TimeoutError if none."""
        self._sock.settimeout(timeout)
        return self._reader.read()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ShardSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RedisCluster:
    """A throwaway Redis Cluster: 3 masters + 3 replicas on 127.0.0.1.

    Tests start it, then break it (``kill_master``, ``move_slot``) and watch it
    heal.  Everything about slots and roles is read from the cluster itself,
    never remembered, so the answers stay right after failovers.  Waits poll
    every node until all agree (``cluster_state:ok``, one slot map, every slot
    served by a running master, replicas linked), with a deadline.
    """

    host = "127.0.0.1"

    def __init__(
        self, *, node_timeout_ms: int = 1000, password: str | None = None, tls: bool = False
    ) -> None:
        self.binary = _find_binary("redis-server", package="redis-server")
        self.cli = _find_binary("redis-cli", package="redis-tools")
        self.node_timeout_ms = node_timeout_ms
        self.password = password
        self.tls = tls
        # One CA for every node (the cluster bus verifies peers too); its
        # certificates name localhost and 127.0.0.1, as CLUSTER SLOTS does.
        self._tls_dir: Path | None = None
        self.tls_files: dict[str, Path] = {}
        if tls:
            self._tls_dir = Path(tempfile.mkdtemp(prefix="chatserver-redis-cluster-tls-"))
            self.tls_files = _write_tls_material(self._tls_dir)
        self._nodes: list[RedisClusterNode] = []
        self._last_map: tuple[tuple[int, int, int], ...] = ()
        self._lost: dict[int, tuple[tuple[int, int], ...]] = {}
        self._started = False
        self._closed = False

    # -- lifecycle -------------------------------------------------------

    @property
    def nodes(self) -> list[RedisClusterNode]:
        """All nodes, running or not (each has ``port``, ``pid``, ``role``)."""
        return list(self._nodes)

    def node(self, port: int) -> RedisClusterNode:
        for node in self._nodes:
            if node.port == port:
                return node
        raise KeyError(f"no node of this cluster listens on port {port}")

    def seed_urls(self) -> list[str]:
        """One URL per node; rediss://localhost under TLS (the name verifies), with the
        password (as the ``default`` user's) if there is one."""
        if not self.tls and not self.password:
            return [f"redis://{self.host}:{node.port}" for node in self._nodes]
        scheme, host = ("rediss", "localhost") if self.tls else ("redis", self.host)
        auth = f"default:{urllib.parse.quote(self.password, safe='')}@" if self.password else ""
        return [f"{scheme}://{auth}{host}:{node.port}" for node in self._nodes]

    def start(self) -> None:
        """Start the nodes, join them with ``redis-cli --cluster create``, wait until ok."""
        if self._closed:
            raise RuntimeError("RedisCluster is closed")
        if self._started:
            return
        self._started = True
        taken: set[int] = set()
        for _ in range(6):
            node = RedisClusterNode(
                node_timeout_ms=self.node_timeout_ms,
                taken=taken,
                password=self.password,
                tls_files=self.tls_files or None,
            )
            self._nodes.append(node)
            node.start()
        argv = [
            self.cli,
            "--cluster",
            "create",
            *(f"{self.host}:{node.port}" for node in self._nodes),
            "--cluster-replicas",
            "1",
            "--cluster-yes",
        ]
        if self.password:
            argv[1:1] = ["-a", self.password, "--no-auth-warning"]
        if self.tls:
            argv[1:1] = ["--tls", "--cacert", str(self.tls_files["ca_file"])]
        env = {k: v for k, v in os.environ.items() if not k.startswith("REDISCLI_")}
        try:
            result = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                env=env,
                timeout=CLUSTER_CREATE_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(
                f"redis-cli --cluster create timed out after {CLUSTER_CREATE_TIMEOUT:.0f}s\n"
                f"{self._log_tails()}"
            ) from exc
        if result.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create failed (exit {result.returncode})\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}\n{self._log_tails()}"
            )
        self._wait_settled("the new cluster to come up")

    def close(self) -> None:
        """Kill every node and delete their directories; idempotent."""
        if self._closed:
            return
        self._closed = True
        for node in self._nodes:
            node.close()
        if self._tls_dir is not None:
            shutil.rmtree(self._tls_dir, ignore_errors=True)

    def __enter__(self) -> RedisCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading the cluster --------------------------------------------

    def _running(self) -> list[RedisClusterNode]:
        nodes = [node for node in self._nodes if node.running]
        if not nodes:
            raise RuntimeError("no node of the cluster is running")
        return nodes

    def _any(self) -> RedisClusterNode:
        """A running node that answers, to ask about the cluster."""
        errors = []
        for node in self._running():
            try:
                node.command("PING")
                return node
            except (OSError, ConnectionError, RedisReplyError) as exc:
                errors.append(f"{node.port}: {exc}")
        raise RuntimeError(f"no node of the cluster answers: {errors}")

    @staticmethod
    def _slot_map(node: RedisClusterNode) -> tuple[tuple[int, int, int], ...]:
        """``(start, end, master port)`` for every assigned range, in slot order."""
        return tuple(
            sorted(
                (int(entry[0]), int(entry[1]), int(entry[2][1]))
                for entry in node.command("CLUSTER", "SLOTS")
            )
        )

    def masters(self) -> list[ClusterMaster]:
        """Masters that serve slots now, with their ranges, in slot order."""
        ranges: dict[int, list[tuple[int, int]]] = {}
        for start, end, port in self._slot_map(self._any()):
            ranges.setdefault(port, []).append((start, end))
        masters = [ClusterMaster(port, tuple(slots)) for port, slots in ranges.items()]
        return sorted(masters, key=lambda master: master.slots[0])

    def keyslot(self, name: str) -> int:
        return int(self._any().command("CLUSTER", "KEYSLOT", name))

    def owner_of_slot(self, slot: int) -> int:
        for start, end, port in self._slot_map(self._any()):
            if start <= slot <= end:
                return port
        raise RuntimeError(f"slot {slot} is not assigned to any master")

    def owner_of(self, channel: str) -> int:
        """Port of the master serving ``channel``'s slot (shard channels hash like keys)."""
        return self.owner_of_slot(self.keyslot(channel))

    def command(self, port: int, *args: Any) -> Any:
        """Run one command on the node at ``port`` (no redirects followed)."""
        return self.node(port).command(*args)

    def subscriber(self, port: int, timeout: float = 5.0) -> ShardSubscriber:
        """A raw connection to ``port`` for SSUBSCRIBE; close it (or use ``with``)."""
        self.node(port)
        return ShardSubscriber(self.host, port, timeout)

    # -- breaking it -----------------------------------------------------

    def kill_master(self, port: int) -> None:
        """SIGKILL a master that serves slots; its replica should take over."""
        owned = [master for master in self.masters() if master.port == port]
        if not owned:
            raise ValueError(f"port {port} is not a master that serves slots")
        self._lost[port] = owned[0].slots
        self.node(port).kill()

    def wait_for_failover(self, old_port: int, timeout: float = 10.0) -> int:
        """Wait until another master serves the killed master's slots and all nodes
        agree with ``cluster_state:ok``; return the new master's port."""
        lost = self._lost.get(old_port) or tuple(
            (start, end) for start, end, port in self._last_map if port == old_port
        )
        if not lost:
            raise ValueError(f"port {old_port} served no slots when last seen")
        if self.node(old_port).running:
            raise ValueError(f"port {old_port} is still running; kill_master it first")

        def moved(slot_map: tuple[tuple[int, int, int], ...]) -> str | None:
            owners = {port for start, end, port in slot_map for s, e in lost if start <= s <= end}
            if old_port in owners or len(owners) != 1:
                return f"slots {lost} are served by {sorted(owners)}"
            return None

        self._wait_settled(f"failover from port {old_port}", timeout, moved)
        return self.owner_of_slot(lost[0][0])

    def restart_node(self, port: int, timeout: float = 10.0) -> str:
        """(Re)start a node on its port with its nodes.conf; a master that lost its
        slots rejoins as a replica.  Waits until the cluster agrees; returns the role."""
        node = self.node(port)
        node.restart()
        self._wait_settled(f"port {port} to rejoin", timeout)
        role = node.role
        if role is None:
            raise RuntimeError(f"port {port} stopped answering after it rejoined")
        return role

    def move_slot(self, slot: int, to_port: int, timeout: float = 10.0) -> None:
        """Reshard one slot to the master at ``to_port`` (the redis-cli sequence)."""
        from_port = self.owner_of_slot(slot)
        if from_port == to_port:
            return
        source, target = self.node(from_port), self.node(to_port)
        if target.role != "master":
            raise ValueError(f"port {to_port} is not a master")
        source_id, target_id = source.node_id, target.node_id
        target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        deadline = time.monotonic() + timeout
        # Pub/sub keeps no keys, but move any a test left in the slot.
        while int(source.command("CLUSTER", "COUNTKEYSINSLOT", slot)) > 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"keys of slot {slot} did not migrate within {timeout}s")
            keys = source.command("CLUSTER", "GETKEYSINSLOT", slot, 100)
            source.command("MIGRATE", self.host, to_port, "", 0, 5000, "KEYS", *keys)
        target.command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        source.command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        for node in self._running():
            if node not in (source, target) and node.role == "master":
                node.command("CLUSTER", "SETSLOT", slot, "NODE", target_id)

        def served(slot_map: tuple[tuple[int, int, int], ...]) -> str | None:
            owner = [port for start, end, port in slot_map if start <= slot <= end]
            return None if owner == [to_port] else f"slot {slot} is served by {owner}"

        self._wait_settled(
            f"slot {slot} to move to port {to_port}", max(0.0, deadline - time.monotonic()), served
        )

    # -- waiting ---------------------------------------------------------

    def _problem(
        self, check: Callable[[tuple[tuple[int, int, int], ...]], str | None] | None
    ) -> str | None:
        """Why the cluster is not settled yet, or None if it is."""
        running = self._running()
        ports = {node.port for node in running}
        maps = set()
        for node in running:
            try:
                info = node.command("CLUSTER", "INFO")
                if "cluster_state:ok" not in info:
                    return f"port {node.port}: cluster_state is not ok"
                slot_map = self._slot_map(node)
                view = node.command("CLUSTER", "NODES")
                role = node.command("ROLE")
            except (OSError, ConnectionError, RedisReplyError) as exc:
                return f"port {node.port}: {exc!r}"
            covered = sum(end - start + 1 for start, end, _ in slot_map)
            if covered != CLUSTER_SLOTS:
                return f"port {node.port}: {covered} slots assigned"
            dead = {port for _, _, port in slot_map} - ports
            if dead:
                return f"port {node.port}: slots still assigned to stopped {sorted(dead)}"
            for line in view.splitlines():
                fields = line.split()
                port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                flags = set(fields[2].split(","))
                if port in ports and flags & {"fail", "fail?", "handshake", "noaddr"}:
                    return f"port {node.port} sees port {port} as {fields[2]}"
            if role[0] == "slave" and role[3] != "connected":
                return f"port {node.port}: replica link to {role[2]} is {role[3]}"
            maps.add(slot_map)
        if len(maps) != 1:
            return f"nodes disagree on the slot map: {sorted(maps)}"
        slot_map = maps.pop()
        problem = check(slot_map) if check else None
        if problem is None:
            self._last_map = slot_map
        return problem

    def _wait_settled(
        self,
        what: str,
        timeout: float = CLUSTER_SETTLE_TIMEOUT,
        check: Callable[[tuple[tuple[int, int, int], ...]], str | None] | None = None,
    ) -> None:
        deadline = time.monotonic() + timeout
        while True:
            problem = self._problem(check)
            if problem is None:
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"timed out after {timeout:.1f}s waiting for {what}: {problem}\n"
                    f"{self._log_tails()}"
                )
            time.sleep(0.05)

    def _log_tails(self, lines: int = 10) -> str:
        return "\n".join(
            f"--- node port {node.port} ({node.dir}) log tail:\n{_log_tail(node.log_file, lines)}"
            for node in self._nodes
        )


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))


def find_postgres_bindir() -> Path:
    """Locate ``initdb``/``pg_ctl``: PATH first, else the newest /usr/lib/postgresql/*/bin.

    Debian does not put initdb on PATH, hence the fallback.
    """
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        # Resolve symlinks so pg_ctl's sibling "postgres" binary is found.
        return Path(initdb).resolve().parent
    candidates = [
        p
        for p in Path("/usr/lib/postgresql").glob("*/bin")
        if (p / "initdb").is_file() and (p / "pg_ctl").is_file()
    ]
    if not candidates:
        raise RuntimeError(
            "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in "
            "/usr/lib/postgresql/*/bin; install the Debian package 'postgresql'"
        )
    return max(candidates, key=_version_key)


class PostgresServer:
    """A private PostgreSQL cluster on 127.0.0.1 with trust auth and fsync off.

    ``durable=True`` turns fsync and synchronous commit on, for benchmarks
    whose numbers must hold for a production database. initdb refuses to run
    as root, so under root the cluster is created and controlled as the
    ``postgres`` system user via ``runuser``.
    """

    host = "127.0.0.1"
    user = "postgres"

    def __init__(self, durable: bool = False) -> None:
        self.durable = durable
        self.bindir = find_postgres_bindir()
        self.port = free_port()
        self._as_root = os.geteuid() == 0
        self._owner: pwd.struct_passwd | None = None
        if self._as_root:
            try:
                self._owner = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError(
                    "running as root but there is no 'postgres' system user to run "
                    "initdb as; install the Debian package 'postgresql'"
                ) from None
        self.dir = Path(tempfile.mkdtemp(prefix="chatserver-pg-", dir="/tmp"))
        if self._owner is not None:
            os.chown(self.dir, self._owner.pw_uid, self._owner.pw_gid)
        self.data_dir = self.dir / "data"
        self.log_file = self.dir / "log"
        self._initialized = False
        self._running = False
        self._closed = False

    @property
    def url(self) -> str:
        """URL of the default ``postgres`` database (trust auth, no password)."""
        return self.database_url("postgres")

    @property
    def running(self) -> bool:
        """Whether the cluster was started and not since stopped or killed via this object."""
        return self._running

    def database_url(self, name: str) -> str:
        """URL for database ``name`` on this cluster."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{urllib.parse.quote(name)}"

    def _run(self, tool: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bindir / tool), *args]
        if self._as_root:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        try:
            return subprocess.run(
                argv,
                cwd=self.dir,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(
                f"{tool} timed out after {timeout:.0f}s; log tail:\n{_log_tail(self.log_file)}"
            ) from exc

    def _check(self, result: subprocess.CompletedProcess[str], what: str) -> None:
        if result.returncode != 0:
            raise RuntimeError(
                f"{what} failed (exit {result.returncode}) for cluster in {self.dir} on "
                f"port {self.port}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}\n"
                f"log tail:\n{_log_tail(self.log_file)}"
            )

    def _initdb(self) -> None:
        result = self._run(
            "initdb",
            "-D",
            str(self.data_dir),
            "-U",
            self.user,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            timeout=60,
        )
        self._check(result, "initdb")
        self._initialized = True

    def start(self) -> None:
        """initdb on first use, then start and wait until it accepts connections."""
        if self._closed:
            raise RuntimeError("PostgresServer is closed")
        if self._running:
            return
        if not self._initialized:
            self._initdb()
        # Command-line settings beat ALTER SYSTEM: a test cannot make it durable.
        sync = "-c fsync=on -c synchronous_commit=on" if self.durable else "-c fsync=off"
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses={self.host} "
            f"{sync} -c max_connections=200"
        )
        result = self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-o",
            options,
            "-l",
            str(self.log_file),
            "-w",
            "-t",
            str(int(START_TIMEOUT)),
            "start",
            timeout=START_TIMEOUT + 5,
        )
        self._check(result, "pg_ctl start")
        self._running = True

    def _pg_stop(self, mode: str) -> None:
        if not self._running:
            return
        result = self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-m",
            mode,
            "-w",
            "-t",
            str(int(STOP_TIMEOUT)),
            "stop",
            timeout=STOP_TIMEOUT + 5,
        )
        self._check(result, f"pg_ctl -m {mode} stop")
        self._running = False

    def stop(self) -> None:
        """Fast shutdown: disconnects clients, rolls back, exits cleanly."""
        self._pg_stop("fast")

    def kill(self) -> None:
        """Immediate shutdown, like a crash; the next start does recovery."""
        self._pg_stop("immediate")

    def restart(self) -> None:
        """Start again on the same port and data directory."""
        self.stop()
        self.start()

    def _connect(self, database: str) -> Any:
        import psycopg2

        conn = psycopg2.connect(
            host=self.host, port=self.port, user=self.user, dbname=database, connect_timeout=5
        )
        conn.autocommit = True
        return conn

    def query(
        self, sql: str | Composable, params: Sequence[Any] = (), *, database: str = "postgres"
    ) -> list[tuple[Any, ...]]:
        """Run one statement in autocommit mode; return its rows ([] if none)."""
        conn = self._connect(database)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return list(cur.fetchall()) if cur.description is not None else []
        finally:
            conn.close()

    def create_database(self, name: str) -> str:
        """Create an empty database so each test gets its own schema; returns its URL."""
        from psycopg2 import sql

        self.query(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.database_url(name)

    def close(self) -> None:
        """Stop the cluster (immediately if a clean stop fails) and delete it; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.stop()
        except RuntimeError:
            with contextlib.suppress(RuntimeError):
                self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
