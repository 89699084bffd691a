"""Throwaway Redis and PostgreSQL servers for tests.

Integration tests need real servers they can kill, restart and inspect, and
they must never touch a developer's or CI machine's own instances.  Each class
here owns a private server in a fresh temporary directory on a free port.
Nothing is registered globally: callers (usually pytest fixtures) must call
``close()``.
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Sequence
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
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server not found on PATH; install the Debian package 'redis-server'"
            )
        self.binary = binary
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
