"""etcd for the tests: Debian's etcd-server, run on 127.0.0.1 only, with free ports and temporary
data directories, always stopped.

:class:`EtcdCluster` starts one member or three (fast elections: 50 ms
heartbeats, 500 ms election timeout), can kill or stop a member and start it
again on the same ports and data, and :meth:`EtcdCluster.stop` ends every
process it started (SIGTERM, then SIGKILL). The fixtures in ``conftest.py``
call it in their finalizers, so no etcd outlives a test, whatever happened.
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"  # never any other address
START_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def etcd_binary() -> str:
    found = shutil.which("etcd")
    if found is None:
        raise AssertionError("etcd is not installed; scripts/install-deps.sh installs Debian's etcd-server")
    return found


@dataclass(frozen=True)
class TlsFiles:
    """A test authority, etcd's certificate (127.0.0.1) and a client's, as PEM files."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """A fresh authority and the two certificates it signs (P-256: made in milliseconds). etcd's
    own gateway dials etcd with the server certificate, so that one may also act as a client."""
    directory.mkdir(parents=True)
    names = ("ca.pem", "etcd.pem", "etcd-key.pem", "me.pem", "me-key.pem")
    files = TlsFiles(*(directory / name for name in names))
    ca_key = directory / "ca-key.pem"
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str | Path) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)

    openssl(
        "req", "-x509", *new_key, "-keyout", ca_key, "-out", files.ca, "-days", "2", "-subj", "/CN=test CA"
    )
    server = "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"
    for cert, key, name, extensions in (
        (files.server_cert, files.server_key, "etcd", server),
        (files.client_cert, files.client_key, "mirenfs", "extendedKeyUsage=clientAuth\n"),
    ):
        request, extension_file = directory / f"{name}.csr", directory / f"{name}.ext"
        extension_file.write_text(extensions)
        openssl("req", *new_key, "-keyout", key, "-out", request, "-subj", f"/CN={name}")
        signed_by_ca = ["-CA", files.ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "2"]
        openssl("x509", "-req", "-in", request, *signed_by_ca, "-out", cert, "-extfile", extension_file)
    return files


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    wanted: bool = True  # False once a test killed or stopped it on purpose
    tls: TlsFiles | None = None

    @property
    def client_url(self) -> str:
        return f"{'http' if self.tls is None else 'https'}://{HOST}:{self.client_port}"

    @property
    def endpoint(self) -> str:
        return f"{HOST}:{self.client_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def _answers(member: Member, *, linearizable: bool = True) -> bool:
    """Whether the member serves a read (linearizable: it has a leader and a quorum)."""
    body = json.dumps({"key": "cHJvYmU=", "serializable": not linearizable}).encode()
    request = urllib.request.Request(f"{member.client_url}/v3/kv/range", data=body, method="POST")
    context = None
    if member.tls is not None:
        context = ssl.create_default_context(cafile=str(member.tls.ca))
        context.load_cert_chain(member.tls.client_cert, member.tls.client_key)
    try:
        with urllib.request.urlopen(request, timeout=1.0, context=context) as answer:
            return bool("header" in json.loads(answer.read()))
    except (OSError, ValueError, urllib.error.URLError):
        return False


@dataclass
class EtcdCluster:
    """``size`` etcd members on 127.0.0.1 under ``root``; :meth:`stop` ends them all. With ``tls``,
    clients speak TLS and must show a certificate the test authority signed."""

    root: Path
    size: int = 1
    tls: TlsFiles | None = None
    members: list[Member] = field(default_factory=list)
    token: str = field(default_factory=lambda: f"mirenfs-test-{secrets.token_hex(4)}")

    def start(self) -> EtcdCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            for index in range(self.size):
                name = f"m{index}"
                self.members.append(
                    Member(
                        name,
                        free_port(),
                        free_port(),
                        self.root / name,
                        self.root / f"{name}.log",
                        tls=self.tls,
                    )
                )
            for member in self.members:
                self._spawn(member, state="new")
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, member: Member, *, state: str) -> None:
        cluster = ",".join(f"{m.name}=http://{HOST}:{m.peer_port}" for m in self.members)
        log = open(member.log_path, "ab")  # noqa: SIM115 - kept open by the child
        member.process = subprocess.Popen(
            [
                etcd_binary(),
                "--name", member.name,
                "--data-dir", str(member.data_dir),
                "--listen-client-urls", member.client_url,
                "--advertise-client-urls", member.client_url,
                "--listen-peer-urls", f"http://{HOST}:{member.peer_port}",
                "--initial-advertise-peer-urls", f"http://{HOST}:{member.peer_port}",
                "--initial-cluster", cluster,
                "--initial-cluster-state", state,
                "--initial-cluster-token", self.token,
                "--heartbeat-interval", "50",
                "--election-timeout", "500",
                "--logger", "zap",
                "--log-level", "error",
                *self._tls_flags(),
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        log.close()

    def _tls_flags(self) -> list[str]:
        if self.tls is None:
            return []
        return [
            "--cert-file", str(self.tls.server_cert),
            "--key-file", str(self.tls.server_key),
            "--client-cert-auth",
            "--trusted-ca-file", str(self.tls.ca),
        ]  # fmt: skip

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        """Until every running member serves linearizable reads (a leader is elected)."""
        deadline = time.monotonic() + timeout
        while True:
            running = [m for m in self.members if m.running]
            dead = [m for m in self.members if m.wanted and not m.running]
            if dead:
                raise AssertionError(f"etcd {dead[0].name} exited: {dead[0].log_path.read_text()[-2000:]}")
            if running and all(_answers(member) for member in running):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"etcd did not become healthy in {timeout}s (logs in {self.root})")
            time.sleep(0.05)

    def url(self, prefix: str) -> str:
        """The ``--catalog`` of this cluster, keys under ``/prefix/``."""
        scheme = "etcd" if self.tls is None else "etcds"
        return f"{scheme}://{','.join(member.endpoint for member in self.members)}/{prefix}"

    def kill(self, index: int) -> None:
        """SIGKILL one member, as a crash would."""
        member = self.members[index]
        member.wanted = False
        if member.process is not None:
            member.process.kill()
            member.process.wait(timeout=10)

    def stop_member(self, index: int) -> None:
        member = self.members[index]
        member.wanted = False
        if member.process is not None and member.process.poll() is None:
            member.process.terminate()
            try:
                member.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                member.process.kill()
                member.process.wait(timeout=10)

    def restart(self, index: int) -> None:
        """Start a stopped or killed member again, on its ports with its data."""
        member = self.members[index]
        member.wanted = True
        if member.running:
            return
        self._spawn(member, state="existing")

    def stop(self) -> None:
        """End every member this cluster started, whatever state it is in. Killed: its data is
        thrown away, and a member told to stop first hands its leadership on (seconds, and
        more when the others are down)."""
        for member in self.members:
            member.wanted = False
            if member.process is not None and member.process.poll() is None:
                member.process.kill()
        for member in self.members:
            if member.process is not None:
                member.process.wait(timeout=10)
