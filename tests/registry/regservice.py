"""Real registries for tests: Debian's ``docker-registry`` (CNCF distribution 2.8) on 127.0.0.1.

- :func:`start_registry` writes a ``config.yml`` (filesystem storage in a temp dir, a free port,
  optional TLS with a certificate made here, optional htpasswd or token auth) and runs
  ``docker-registry serve`` as a process we own (stopped by its PID).
- :class:`TokenIssuer`: a small bearer-token service (distribution's ``auth.token``): checks Basic
  credentials, signs an ES256 JWT with a test key whose certificate the registry trusts (``x5c``).
- :class:`FaultProxy`: a TCP proxy in front of a registry that drops connections on cue, either
  just before the Nth ``PATCH`` reaches the registry, or after N request-body bytes.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import http.server
import json
import os
import secrets
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import services

USER = "pusher"
PASSWORD = "correct-horse-battery-staple"  # a throwaway test password
REFRESH_TOKEN = "test-refresh-token-0123"  # what `docker login` would store as identitytoken


@dataclass
class TLSFiles:
    cert: Path
    key: Path


def make_cert(workdir: Path, name: str = "registry") -> TLSFiles:
    """A self-signed certificate for 127.0.0.1 and localhost (it is its own CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"blobchain test {name}")])
    now = dt.datetime.now(dt.UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    files = TLSFiles(workdir / f"{name}.crt", workdir / f"{name}.key")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    files.key.chmod(0o600)
    return files


def htpasswd_line(user: str, password: str) -> str:
    import bcrypt

    return f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()}\n"


class TokenIssuer:
    """``GET /token?service=&scope=...`` with Basic auth -> ``{"token": JWT}`` granting the asked
    scopes to ``USER`` (and pull to anonymous callers). Counts requests for tests."""

    def __init__(self, workdir: Path, service: str = "blobchain-test-registry") -> None:
        from cryptography.hazmat.primitives.serialization import Encoding

        self.service = service
        self.issuer = "blobchain-test-issuer"
        self.signing = make_cert(workdir, "token-signer")
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(self.signing.cert.read_bytes())
        self._x5c = base64.b64encode(cert.public_bytes(Encoding.DER)).decode()
        self._key = self.signing.key.read_bytes()
        self.requests = 0
        self.denied = 0
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                return None

            def do_POST(self) -> None:
                # OAuth2 refresh-token grant: the identity token stands for USER
                issuer.requests += 1
                form = parse_qs(self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode())
                if form.get("grant_type") != ["refresh_token"] or form.get("refresh_token") != [
                    REFRESH_TOKEN
                ]:
                    issuer.denied += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                self._grant(USER, form.get("scope", []), key="access_token")

            def do_GET(self) -> None:
                issuer.requests += 1
                q = parse_qs(urlsplit(self.path).query)
                user = None
                auth = self.headers.get("Authorization", "")
                if auth.startswith("Basic "):
                    u, _, p = base64.b64decode(auth[6:]).decode().partition(":")
                    if (u, p) != (USER, PASSWORD):
                        issuer.denied += 1
                        self.send_response(401)
                        self.send_header("Content-Type", "application/json")
                        self.end_headers()
                        self.wfile.write(b'{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}')
                        return
                    user = u
                self._grant(user, q.get("scope", []))

            def _grant(self, user: str | None, scopes: list[str], key: str = "token") -> None:
                access = []
                for scope in scopes:
                    for one in scope.split(" "):
                        typ, _, rest = one.partition(":")
                        name, _, actions = rest.rpartition(":")
                        granted = (
                            actions.split(",") if user else [a for a in actions.split(",") if a == "pull"]
                        )
                        access.append({"type": typ, "name": name, "actions": granted})
                body = json.dumps({key: issuer.token(user or "", access), "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.port = services.free_port()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def token(self, subject: str, access: list[dict[str, Any]]) -> str:
        import jwt

        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "iat": now - 5,
            "nbf": now - 5,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"x5c": [self._x5c]})

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class RegistryProcess(services._Process):
    name = "registry"

    def __init__(
        self,
        workdir: Path,
        *,
        tls: TLSFiles | None = None,
        htpasswd: Path | None = None,
        token: TokenIssuer | None = None,
    ) -> None:
        super().__init__(workdir)
        self.binary = services.require_tool("docker-registry", "docker-registry")
        self.port = services.free_port()
        self.tls = tls
        self.storage = workdir / "storage"
        self.storage.mkdir(exist_ok=True)
        cfg: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)}, "delete": {"enabled": True}},
            "http": {"addr": f"127.0.0.1:{self.port}", "secret": secrets.token_hex(16)},
        }
        if tls:
            cfg["http"]["tls"] = {"certificate": str(tls.cert), "key": str(tls.key)}
        if htpasswd:
            cfg["auth"] = {"htpasswd": {"realm": "blobchain-test", "path": str(htpasswd)}}
        if token:
            cfg["auth"] = {
                "token": {
                    "realm": token.realm,
                    "service": token.service,
                    "issuer": token.issuer,
                    "rootcertbundle": str(token.signing.cert),
                }
            }
        self.config = workdir / "config.yml"
        self.config.write_text(json.dumps(cfg))  # JSON is YAML
        self._env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return [self.binary, "serve", str(self.config)]

    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def start(self, timeout_s: float = 60.0) -> None:
        if self.running:
            return
        log = open(self.workdir / "registry.log", "ab")
        try:
            self.proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self._env,
                preexec_fn=services._die_with_parent
                if threading.current_thread() is threading.main_thread()
                else None,
            )
        finally:
            log.close()
        try:
            services._wait_until(
                self.ready, timeout_s, f"docker-registry (log: {self.workdir}/registry.log)", self.proc
            )
        except BaseException:
            self.stop()
            raise

    def log(self) -> str:
        try:
            return (self.workdir / "registry.log").read_text(errors="replace")
        except OSError:
            return ""

    def repositories(self) -> list[str]:
        root = self.storage / "docker" / "registry" / "v2" / "repositories"
        out = []
        for d, dirs, _ in os.walk(root):
            if "_manifests" in dirs:
                out.append(os.path.relpath(d, root))
        return sorted(out)

    def tags(self, repo: str) -> list[str]:
        d = self.storage / "docker" / "registry" / "v2" / "repositories" / repo / "_manifests" / "tags"
        return sorted(os.listdir(d)) if d.is_dir() else []

    def has_blob(self, digest: str) -> bool:
        hexd = digest[7:]
        return (self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data").exists()


@contextlib.contextmanager
def registry(workdir: Path, **kw: Any) -> Iterator[RegistryProcess]:
    proc = RegistryProcess(workdir, **kw)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


# --- a TCP proxy that drops connections ---------------------------------------------------------


@dataclass
class FaultProxy:
    """Forward 127.0.0.1:port -> target. Faults (each fires once, then the proxy forwards):

    - ``drop_before_patch = N``: close the client's connection when the Nth ``PATCH`` request
      arrives, before any of it reaches the registry;
    - ``drop_after_body_bytes = N``: close both sides once N request-body bytes have passed
      (the registry sees a torn request);
    - ``drop_after_blob_bytes = N``: close both sides once N bytes of responses to blob
      ``GET``s have passed (the client sees a download torn mid-body).

    ``rate_bps`` throttles request bodies.
    """

    target_port: int
    drop_before_patch: int | None = None
    drop_after_body_bytes: int | None = None
    rate_bps: float | None = None  # throttle request bodies (so a test can interrupt a push)
    drop_after_blob_bytes: int | None = None
    blob_bytes: int = 0
    port: int = 0
    patches: int = 0
    body_bytes: int = 0
    drops: int = 0
    _sock: socket.socket | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.port = services.free_port()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", self.port))
        self._sock.listen(64)
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            client.close()
            return
        state = {"blob_get": False}
        threading.Thread(target=self._pump, args=(upstream, client, state), daemon=True).start()
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = client.recv(65536)
                    if not data:
                        return
                    buf += data
                    if buf[:1] == b"\x16":
                        # A TLS ClientHello (the client's https-first probe of an insecure
                        # registry): no HTTP head will come, so pass it through for the plain
                        # registry to refuse at once, as it does without the proxy; waiting for
                        # a head hung each probe for the client's 10 s connect timeout.
                        upstream.sendall(buf)
                        while data := client.recv(65536):
                            upstream.sendall(data)
                        return
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                length = 0
                chunked = False
                for line in lines[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v.strip())
                    if k.strip().lower() == b"transfer-encoding" and b"chunked" in v.lower():
                        chunked = True
                state["blob_get"] = lines[0].startswith(b"GET ") and b"/blobs/" in lines[0]
                if lines[0].startswith(b"PATCH "):
                    with self._lock:
                        self.patches += 1
                        fire = self.drop_before_patch is not None and self.patches == self.drop_before_patch
                        if fire:
                            self.drop_before_patch = None
                            self.drops += 1
                    if fire:
                        return
                upstream.sendall(head + b"\r\n\r\n")
                if chunked:  # not parsed: forward the rest of the connection as is
                    upstream.sendall(buf)
                    while data := client.recv(65536):
                        upstream.sendall(data)
                    return
                while length > 0:
                    if not buf:
                        buf = client.recv(min(65536, length))
                        if not buf:
                            return
                    part, buf = buf[:length], buf[length:]
                    with self._lock:
                        self.body_bytes += len(part)
                        limit = self.drop_after_body_bytes
                        fire = limit is not None and self.body_bytes >= limit
                        if fire:
                            self.drop_after_body_bytes = None
                            self.drops += 1
                            keep = len(part) - (self.body_bytes - limit)  # type: ignore[operator]
                    if fire:
                        upstream.sendall(part[:keep])
                        return
                    upstream.sendall(part)
                    length -= len(part)
                    if self.rate_bps:
                        time.sleep(len(part) / self.rate_bps)
        except OSError:
            return
        finally:
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()

    def _pump(self, src: socket.socket, dst: socket.socket, state: dict[str, bool] | None = None) -> None:
        try:
            while data := src.recv(65536):
                if state is not None and state["blob_get"]:
                    with self._lock:
                        limit = self.drop_after_blob_bytes
                        self.blob_bytes += len(data)
                        fire = limit is not None and self.blob_bytes >= limit
                        if fire:
                            self.drop_after_blob_bytes = None
                            self.drops += 1
                            data = data[: len(data) - (self.blob_bytes - limit)]  # type: ignore[operator]
                    if fire:
                        dst.sendall(data)
                        with contextlib.suppress(OSError):
                            src.shutdown(socket.SHUT_RDWR)
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_RDWR)


# --- helpers for push tests ---------------------------------------------------------------------


def export_layout(tmp: Path, *args: str, tag: str = "v1", snaps: list[str] | None = None) -> tuple[str, str]:
    """Export the sample chain to a layout; returns (layout, manifest digest)."""
    import io

    from blobchain.client.cli import main
    from blobchain.client.sample import make_sample_chain

    chain = snaps or make_sample_chain(str(tmp / "snaps"))
    out = str(tmp / "oci")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["export", *chain, "--oci", out, "--tag", tag, "--json", "--quiet", *args])
    assert rc == 0
    return out, json.loads(buf.getvalue())["manifest"]


def auth_file(home: Path, registry: str, user: str, password: str) -> Path:
    import base64

    path = home / "auth.json"
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {registry: {"auth": token}}}))
    os.chmod(path, 0o600)
    return path
