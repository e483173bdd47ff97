"""The registry client against a hostile or broken registry: a small HTTP server in a thread
(real sockets on 127.0.0.1, no mocks) that serves one image and misbehaves as each test asks.

What must hold whatever the registry does: memory stays bounded (no answer is read whole past
a limit), the failure is a named error (the CLI: one line and the documented exit code, never
a traceback), retries and resumes end, credentials go nowhere they should not and appear in no
message, and the content store holds nothing partial afterwards.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import http.server
import io
import json
import os
import socket
import ssl
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import regservice

from blobchain.client.base import BaseImage, check_base_config
from blobchain.client.cli import main
from blobchain.client.image import ImageNotFound, InvalidImage, RegistryImageSource, resolve
from blobchain.layers.errors import DigestMismatch
from blobchain.registry.auth import Credentials
from blobchain.registry.client import RegistryClient, TransportOptions
from blobchain.registry.errors import (
    RegistryProtocolError,
    RegistryUnavailable,
    TooManyRequests,
    Unauthorized,
)
from blobchain.registry.reference import parse_reference
from blobchain.storage.content.local import LocalContentStore

REPO = "hostile/img"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
SECRET = "hunter2-do-not-print"
# Fast and bounded: few attempts, millisecond backoff, a short read timeout.
FAST = TransportOptions(insecure=True, attempts=3, backoff_s=0.001, read_timeout_s=5.0, connect_timeout_s=2.0)

Handler = http.server.BaseHTTPRequestHandler
Behaviour = Callable[["_Handler"], bool]  # True: the request was answered


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Image:
    layer: bytes
    diff_id: str
    config: bytes
    manifest: bytes

    @property
    def layer_digest(self) -> str:
        return _digest(self.layer)

    @property
    def config_digest(self) -> str:
        return _digest(self.config)

    @property
    def manifest_digest(self) -> str:
        return _digest(self.manifest)


def make_image(config: dict[str, Any] | None = None, layer_size: int | None = None) -> Image:
    """One gzip layer holding 256 KiB of random bytes (incompressible: a blob worth resuming)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        data = os.urandom(256 << 10)
        info = tarfile.TarInfo("payload")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    tar_bytes = raw.getvalue()
    layer = gzip.compress(tar_bytes, mtime=0)
    diff_id = _digest(tar_bytes)
    cfg = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        **(config or {}),
    }
    cfg_bytes = json.dumps(cfg).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _digest(cfg_bytes),
                "size": len(cfg_bytes),
            },
            "layers": [{"mediaType": GZIP_LAYER, "digest": _digest(layer), "size": layer_size or len(layer)}],
        }
    ).encode()
    return Image(layer, diff_id, cfg_bytes, manifest)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *a: Any) -> None:
        return None

    def do_GET(self) -> None:
        self.server.hostile.dispatch(self)

    do_HEAD = do_GET
    do_POST = do_GET
    do_PUT = do_GET
    do_PATCH = do_GET

    # --- answers the behaviours build from ------------------------------------------------

    def answer(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        hdrs = {"Content-Length": str(len(body)), **(headers or {})}
        for k, v in hdrs.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def endless(self, status: int = 200, headers: dict[str, str] | None = None) -> None:
        """A body that never ends (close-delimited), sent until the client hangs up or the
        server's own cap (so a client that never stops still lets the test end)."""
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        chunk = b"\x00" * (64 << 10)
        try:
            while self.server.hostile.sent < self.server.hostile.cap:
                self.wfile.write(chunk)
                self.server.hostile.sent += len(chunk)
        except OSError:
            pass

    def drop(self) -> None:
        """Close the connection with nothing (more) sent."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)

    def torn(self, data: bytes, start: int, part: int) -> None:
        """Begin ``data`` from ``start`` (206 for a Range), send ``part`` bytes, then drop: the
        client reads those bytes before it sees the connection end."""
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(data[start : start + part])
            self.wfile.flush()
        time.sleep(0.05)
        self.drop()

    @property
    def blob(self) -> str | None:
        """The digest of a /blobs/ request."""
        return self.path.rsplit("/", 1)[1] if f"/v2/{REPO}/blobs/sha256:" in self.path else None


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    hostile: Hostile


@dataclass
class Hostile:
    """A registry serving ``image`` as ``hostile/img:1`` (and by digest); ``behaviours`` go first.
    ``requests`` logs (method, path, headers) of every request."""

    image: Image = field(default_factory=make_image)
    host: str = "127.0.0.1"
    tls: regservice.TLSFiles | None = None
    behaviours: list[Behaviour] = field(default_factory=list)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    manifest_type: str = OCI_MANIFEST
    sent: int = 0  # bytes of endless bodies sent
    cap: int = 256 << 20
    index: bytes | None = None

    def __post_init__(self) -> None:
        self._server = _Server((self.host, 0), _Handler)
        self._server.hostile = self
        if self.tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.tls.cert, self.tls.key)
            self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        # a short poll: shutdown() waits for it, once per server per test
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def ref(self) -> str:
        return f"{self.address}/{REPO}:1"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.address}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def on(self, behaviour: Behaviour) -> Behaviour:
        self.behaviours.append(behaviour)
        return behaviour

    def count(self, method: str, part: str) -> int:
        return sum(1 for m, p, _ in self.requests if m == method and part in p)

    def dispatch(self, h: _Handler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        if length:
            h.rfile.read(length)
        self.requests.append((h.command, h.path, dict(h.headers.items())))
        for b in list(self.behaviours):
            if b(h):
                return
        self.default(h)

    def default(self, h: _Handler) -> None:
        path = h.path.split("?", 1)[0]
        img = self.image
        if path == "/v2/":
            return h.answer(200, b"{}")
        manifests = (
            {"1": (self.index, OCI_INDEX)} if self.index else {"1": (img.manifest, self.manifest_type)}
        )
        manifests[img.manifest_digest] = (img.manifest, self.manifest_type)
        if self.index:
            manifests[_digest(self.index)] = (self.index, OCI_INDEX)
        prefix = f"/v2/{REPO}/manifests/"
        if path.startswith(prefix) and path[len(prefix) :] in manifests:
            body, mt = manifests[path[len(prefix) :]]
            return h.answer(200, body, {"Content-Type": mt, "Docker-Content-Digest": _digest(body)})
        blobs = {img.layer_digest: img.layer, img.config_digest: img.config}
        digest = h.blob
        if digest in blobs:
            data = blobs[digest]
            rng = h.headers.get("Range", "")
            if rng.startswith("bytes="):
                start = int(rng[6:].split("-")[0])
                return h.answer(
                    206, data[start:], {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
                )
            return h.answer(200, data)
        body = json.dumps({"errors": [{"code": "BLOB_UNKNOWN", "message": "unknown"}]}).encode()
        return h.answer(404, body, {"Content-Type": "application/json"})


@pytest.fixture
def hostile() -> Iterator[Hostile]:
    reg = Hostile()
    try:
        yield reg
    finally:
        reg.close()


@pytest.fixture
def store(tmp_path: Path) -> LocalContentStore:
    return LocalContentStore(tmp_path / "store")


def _source(reg: Hostile, options: TransportOptions = FAST, ref: str | None = None) -> RegistryImageSource:
    return RegistryImageSource(ref or reg.ref, options)


def _base(reg: Hostile, options: TransportOptions = FAST) -> BaseImage:
    src = _source(reg, options)
    return BaseImage(resolve(src), src, (), None, attempts=options.attempts, backoff_s=options.backoff_s)


def _nothing_partial(store: LocalContentStore) -> None:
    """No blob published, no ingest left behind."""
    assert os.listdir(store.blobs_dir) == []
    assert os.listdir(store.ingest_dir) == []


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(list(args))
    err = capsys.readouterr().err
    return rc, err


def _one_line(err: str, code: str) -> None:
    assert err.startswith(f"error ({code}): "), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


# --- sizes: nothing is read whole past a limit ---------------------------------------------------


def test_a_manifest_declared_huge_is_refused_unread(hostile: Hostile, capsys, tmp_path: Path) -> None:
    def huge(h: _Handler) -> bool:
        if "/manifests/" not in h.path:
            return False
        h.send_response(200)
        h.send_header("Content-Type", OCI_MANIFEST)
        h.send_header("Content-Length", str(100 << 20))
        h.end_headers()
        with contextlib.suppress(OSError):
            for _ in range(1600):  # up to 100 MiB, if the client reads it
                h.wfile.write(b" " * (64 << 10))
                hostile.sent += 64 << 10
        return True

    hostile.on(huge)
    with pytest.raises(RegistryProtocolError, match="over the 4194304"):
        _source(hostile).top()
    rc, err = _cli(capsys, "unpack", f"docker://{hostile.ref}", str(tmp_path / "u"), "--insecure")
    assert rc == 4
    _one_line(err, "registry_unknown")
    assert hostile.sent < 32 << 20  # a few socket buffers, not the 100 MiB


def test_an_endless_manifest_is_cut_at_the_limit(hostile: Hostile) -> None:
    hostile.on(lambda h: "/manifests/" in h.path and (h.endless(200, {"Content-Type": OCI_MANIFEST}) or True))
    with pytest.raises(RegistryProtocolError, match="over the"):
        _source(hostile).top()
    assert hostile.sent < 32 << 20


def test_an_endless_error_body_is_cut_too(hostile: Hostile) -> None:
    hostile.on(lambda h: "/manifests/" in h.path and (h.endless(400) or True))
    with pytest.raises(RegistryProtocolError, match="registry answered 400"):
        _source(hostile).top()
    assert hostile.sent < 32 << 20


def test_a_resumed_range_that_never_ends_fills_nothing(hostile: Hostile, store) -> None:
    img = hostile.image
    drops = {"n": 0}

    def torn_then_endless(h: _Handler) -> bool:
        if h.blob != img.layer_digest:
            return False
        rng = h.headers.get("Range", "")
        if not rng:
            drops["n"] += 1
            h.torn(img.layer, 0, 64 << 10)
            return True
        start = rng[6:].split("-")[0]
        h.endless(206, {"Content-Range": f"bytes {start}-{len(img.layer) - 1}/{len(img.layer)}"})
        return True

    hostile.on(torn_then_endless)
    base = _base(hostile)
    with pytest.raises(DigestMismatch, match="more than"):
        base.fetch(store, img.layer_digest)
    assert hostile.sent < 32 << 20
    _nothing_partial(store)


# --- bytes that do not match -------------------------------------------------------------------


def test_manifest_config_and_blob_bytes_that_do_not_match_their_digest(hostile: Hostile, store) -> None:
    img = hostile.image
    # by digest: the manifest hashes to something else
    other = make_image()
    hostile.on(
        lambda h: (
            h.path.endswith(f"/manifests/{img.manifest_digest}")
            and (h.answer(200, other.manifest, {"Content-Type": OCI_MANIFEST}) or True)
        )
    )
    with pytest.raises(DigestMismatch):
        _source(hostile, ref=f"{hostile.address}/{REPO}@{img.manifest_digest}").top()
    hostile.behaviours.clear()
    # the config
    hostile.on(lambda h: h.blob == img.config_digest and (h.answer(200, img.config[:-1] + b" ") or True))
    with pytest.raises(DigestMismatch):
        resolve(_source(hostile))
    hostile.behaviours.clear()
    # a layer: the store keeps nothing
    base = _base(hostile)
    bad = bytearray(img.layer)
    bad[-20] ^= 0xFF
    hostile.on(lambda h: h.blob == img.layer_digest and (h.answer(200, bytes(bad)) or True))
    with pytest.raises(DigestMismatch):
        base.fetch(store, img.layer_digest)
    _nothing_partial(store)


@pytest.mark.parametrize("lie", ["short", "long"])
def test_content_length_lies(hostile: Hostile, store, lie: str) -> None:
    img = hostile.image

    def liar(h: _Handler) -> bool:
        if h.blob != img.layer_digest:
            return False
        declared = len(img.layer) + (4096 if lie == "short" else -4096)
        h.send_response(200)
        h.send_header("Content-Length", str(declared))
        h.end_headers()
        h.wfile.write(img.layer)  # short: the body ends before the length; long: more follows
        h.drop()
        return True

    hostile.on(liar)
    base = _base(hostile)
    if lie == "short":
        # every byte arrived before the connection broke: the blob is whole, verified, kept
        assert base.fetch(store, img.layer_digest) is True
        assert store.verify(img.layer_digest) is not None
        return
    with pytest.raises(DigestMismatch):  # the body as declared is the blob cut short
        base.fetch(store, img.layer_digest)
    _nothing_partial(store)


# --- resumes end -------------------------------------------------------------------------------


def test_a_connection_dropped_mid_blob_every_time_ends(hostile: Hostile, store) -> None:
    img = hostile.image

    def tear(h: _Handler) -> bool:
        if h.blob != img.layer_digest:
            return False
        rng = h.headers.get("Range", "")
        h.torn(img.layer, int(rng[6:].split("-")[0]) if rng else 0, 1000)  # some progress, then gone
        return True

    hostile.on(tear)
    base = _base(hostile)
    with pytest.raises(RegistryUnavailable):
        base.fetch(store, img.layer_digest)
    assert base.resumed == FAST.attempts - 1
    assert hostile.count("GET", img.layer_digest) <= FAST.attempts * FAST.attempts
    _nothing_partial(store)


def _torn_once_then(img: Image, resume: Callable[[_Handler], None]) -> Callable[[_Handler], bool]:
    """A layer GET torn after 64 KiB the first time; every later one (the resume) answered by
    ``resume``."""
    state = {"dropped": False}

    def behave(h: _Handler) -> bool:
        if h.blob != img.layer_digest:
            return False
        if not state["dropped"]:
            state["dropped"] = True
            h.torn(img.layer, 0, 64 << 10)
        else:
            resume(h)
        return True

    return behave


def test_a_range_answered_with_the_whole_blob_resumes_right(hostile: Hostile, store) -> None:
    img = hostile.image
    hostile.on(_torn_once_then(img, lambda h: h.answer(200, img.layer)))  # the Range ignored
    base = _base(hostile)
    assert base.fetch(store, img.layer_digest) is True
    assert base.resumed == 1
    assert store.verify(img.layer_digest) is not None


def test_a_range_answered_from_the_wrong_offset_is_refused(hostile: Hostile, store) -> None:
    img = hostile.image
    # 206, but from byte 0 (and says so): appending it would corrupt the blob
    whole = {"Content-Range": f"bytes 0-{len(img.layer) - 1}/{len(img.layer)}"}
    hostile.on(_torn_once_then(img, lambda h: h.answer(206, img.layer, whole)))
    base = _base(hostile)
    with pytest.raises(RegistryProtocolError, match="Content-Range"):
        base.fetch(store, img.layer_digest)
    _nothing_partial(store)


# --- redirects ---------------------------------------------------------------------------------


def test_a_redirect_loop_is_a_named_error_not_a_traceback(hostile: Hostile, capsys, tmp_path) -> None:
    hostile.on(lambda h: "/manifests/" in h.path and (h.answer(302, b"", {"Location": h.path}) or True))
    with pytest.raises(RegistryProtocolError, match="redirects"):
        _source(hostile).top()
    rc, err = _cli(capsys, "unpack", f"docker://{hostile.ref}", str(tmp_path / "u"), "--insecure")
    assert rc == 4
    _one_line(err, "registry_unknown")
    assert not (tmp_path / "u").exists()


def test_a_redirect_to_file_is_refused_and_not_retried(hostile: Hostile, store) -> None:
    img = hostile.image
    hostile.on(
        lambda h: (
            h.blob == img.layer_digest and (h.answer(302, b"", {"Location": "file:///etc/passwd"}) or True)
        )
    )
    base = _base(hostile)
    with pytest.raises(RegistryProtocolError, match="unsupported protocol"):
        base.fetch(store, img.layer_digest)
    assert hostile.count("GET", img.layer_digest) == 1
    _nothing_partial(store)


def test_a_redirect_to_another_host_gets_no_credentials(hostile: Hostile, store) -> None:
    img = hostile.image
    other = Hostile(image=img, host="127.0.0.2")
    try:
        hostile.on(
            lambda h: (
                h.blob == img.layer_digest
                and (
                    h.answer(307, b"", {"Location": f"{other.url}/v2/{REPO}/blobs/{img.layer_digest}"})
                    or True
                )
            )
        )
        opts = FAST
        src = RegistryImageSource(hostile.ref, opts)
        src.puller._client = RegistryClient(
            src.ref, opts, credentials=Credentials("u", SECRET, "", "test"), push=False
        )
        # the registry asks for basic auth; the storage host it redirects blobs to is not it
        hostile.on(
            lambda h: (
                "Authorization" not in h.headers
                and (h.answer(401, b"", {"WWW-Authenticate": 'Basic realm="x"'}) or True)
            )
        )
        base = BaseImage(resolve(src), src, (), None, attempts=2, backoff_s=0.001)
        assert base.fetch(store, img.layer_digest) is True
        assert other.count("GET", img.layer_digest) == 1
        assert all("Authorization" not in hdrs for _, _, hdrs in other.requests)
        assert any(hdrs.get("Authorization", "").startswith("Basic ") for _, _, hdrs in hostile.requests)
    finally:
        other.close()


def test_a_tls_registry_redirecting_to_plain_http_is_refused(tmp_path: Path, store) -> None:
    tls = regservice.make_cert(tmp_path)
    img = make_image()
    plain = Hostile(image=img)
    secure = Hostile(image=img, tls=tls)
    try:
        secure.on(
            lambda h: (
                h.blob == img.layer_digest
                and (
                    h.answer(302, b"", {"Location": f"{plain.url}/v2/{REPO}/blobs/{img.layer_digest}"})
                    or True
                )
            )
        )
        opts = TransportOptions(ca=str(tls.cert), attempts=2, backoff_s=0.001, read_timeout_s=5.0)
        base = _base(secure, opts)
        with pytest.raises(RegistryProtocolError, match="plain-text"):
            base.fetch(store, img.layer_digest)
        assert plain.count("GET", img.layer_digest) == 0
        _nothing_partial(store)
    finally:
        plain.close()
        secure.close()


# --- auth --------------------------------------------------------------------------------------


def _bearer(reg: Hostile, realm: str) -> Behaviour:
    def challenge(h: _Handler) -> bool:
        if h.headers.get("Authorization", "").startswith("Bearer "):
            return False
        h.answer(401, b"", {"WWW-Authenticate": f'Bearer realm="{realm}",service="hostile"'})
        return True

    return challenge


def _token_service(answer: Callable[[_Handler], None], host: str = "127.0.0.2") -> Hostile:
    svc = Hostile(host=host)
    svc.on(lambda h: h.path.startswith("/token") and (answer(h) or True))
    return svc


def _client(reg: Hostile, options: TransportOptions = FAST, password: str = SECRET) -> RegistryClient:
    return RegistryClient(
        parse_reference(reg.ref), options, credentials=Credentials("u", password, "", "test"), push=False
    )


def test_credentials_go_to_a_bearer_realm_on_another_host_as_docker_sends_them(hostile: Hostile) -> None:
    # Docker Hub's realm (auth.docker.io) is not its registry host: clients send the basic
    # credentials to whatever realm the registry names. The token then goes to the registry only.
    svc = _token_service(lambda h: h.answer(200, b'{"token": "tok-abc"}'))
    try:
        hostile.on(_bearer(hostile, f"{svc.url}/token"))
        with _client(hostile) as c:
            c.get_manifest("1", [OCI_MANIFEST])
        want = "Basic " + base64.b64encode(f"u:{SECRET}".encode()).decode()
        assert [hdrs.get("Authorization") for _, _, hdrs in svc.requests] == [want]
        assert any(hdrs.get("Authorization") == "Bearer tok-abc" for _, _, hdrs in hostile.requests)
    finally:
        svc.close()


def test_a_plain_http_realm_of_a_tls_registry_gets_no_credentials(tmp_path: Path) -> None:
    tls = regservice.make_cert(tmp_path)
    secure = Hostile(tls=tls)
    svc = _token_service(lambda h: h.answer(200, b'{"token": "tok-abc"}'))
    try:
        secure.on(_bearer(secure, f"{svc.url}/token"))
        opts = TransportOptions(ca=str(tls.cert), attempts=2, backoff_s=0.001, read_timeout_s=5.0)
        with _client(secure, opts) as c, pytest.raises(Unauthorized, match="plain http") as e:
            c.get_manifest("1", [OCI_MANIFEST])
        assert svc.requests == [] and SECRET not in e.value.message
    finally:
        svc.close()
        secure.close()


@pytest.mark.parametrize(
    "body",
    [
        b"[1, 2, 3]",
        b'"just a string"',
        b"not json at all",
        b'{"token": 42}',
        b'{"token": "a\\r\\nX-Evil: 1"}',
    ],
)
def test_token_service_garbage_is_unauthorized(hostile: Hostile, body: bytes) -> None:
    svc = _token_service(lambda h: h.answer(200, body, {"Content-Type": "application/json"}))
    try:
        hostile.on(_bearer(hostile, f"{svc.url}/token"))
        with _client(hostile) as c, pytest.raises(Unauthorized) as e:
            c.get_manifest("1", [OCI_MANIFEST])
        assert "X-Evil" not in e.value.message and SECRET not in e.value.message
    finally:
        svc.close()


def test_a_huge_token_answer_is_cut(hostile: Hostile) -> None:
    svc = _token_service(lambda h: h.endless(200, {"Content-Type": "application/json"}))
    try:
        hostile.on(_bearer(hostile, f"{svc.url}/token"))
        with _client(hostile) as c, pytest.raises(RegistryProtocolError, match="over the"):
            c.get_manifest("1", [OCI_MANIFEST])
        assert svc.sent < 32 << 20
    finally:
        svc.close()


def test_401_forever_ends_without_printing_secrets(hostile: Hostile, capsys, tmp_path, monkeypatch) -> None:
    svc = _token_service(lambda h: h.answer(200, b'{"token": "tok-secret-0123"}'))
    try:
        hostile.on(
            lambda h: (
                h.path != "/v2/"
                and (h.answer(401, b"", {"WWW-Authenticate": f'Bearer realm="{svc.url}/token"'}) or True)
            )
        )
        with _client(hostile) as c, pytest.raises(Unauthorized) as e:
            c.get_manifest("1", [OCI_MANIFEST])
        assert "tok-secret" not in e.value.message and SECRET not in e.value.message
        assert hostile.count("GET", "/manifests/") == 2  # the first try and one re-authorized
        monkeypatch.setenv("BLOBCHAIN_REGISTRY_USERNAME", "u")
        monkeypatch.setenv("BLOBCHAIN_REGISTRY_PASSWORD", SECRET)
        rc, err = _cli(capsys, "unpack", f"docker://{hostile.ref}", str(tmp_path / "u"), "--insecure")
        assert rc == 4
        _one_line(err, "registry_unauthorized")
        assert SECRET not in err and "tok-secret" not in err
    finally:
        svc.close()


def test_a_registry_echoing_credentials_gets_them_masked(
    hostile: Hostile, capsys, tmp_path, monkeypatch
) -> None:
    def echo(h: _Handler) -> bool:
        if "/manifests/" not in h.path:
            return False
        auth = h.headers.get("Authorization", "")
        if not auth:
            h.answer(401, b"", {"WWW-Authenticate": 'Basic realm="x"'})
            return True
        user_pw = base64.b64decode(auth.split(" ")[1]).decode()
        msg = f"denied for {auth} ({user_pw})\x1b]0;pwned\x07\nsecond line " + "x" * 5000
        h.answer(403, json.dumps({"errors": [{"code": "DENIED", "message": msg}]}).encode())
        return True

    hostile.on(echo)
    monkeypatch.setenv("BLOBCHAIN_REGISTRY_USERNAME", "u")
    monkeypatch.setenv("BLOBCHAIN_REGISTRY_PASSWORD", SECRET)
    rc, err = _cli(capsys, "unpack", f"docker://{hostile.ref}", str(tmp_path / "u"), "--insecure")
    assert rc == 4
    _one_line(err, "registry_denied")
    basic = base64.b64encode(f"u:{SECRET}".encode()).decode()
    assert SECRET not in err and basic not in err and "\x1b" not in err
    assert len(err) < 1000


def test_429_and_503_are_retried_a_bounded_number_of_times(hostile: Hostile) -> None:
    status = {"code": 429}
    hostile.on(
        lambda h: (
            "/manifests/" in h.path and (h.answer(status["code"], b"", {"Retry-After": "86400"}) or True)
        )
    )
    with pytest.raises(TooManyRequests):
        _source(hostile).top()
    assert hostile.count("GET", "/manifests/") == FAST.attempts
    status["code"] = 503
    with pytest.raises(RegistryUnavailable):
        _source(hostile).top()
    assert hostile.count("GET", "/manifests/") == 2 * FAST.attempts


# --- what the registry serves ------------------------------------------------------------------


def test_an_index_without_this_platform(hostile: Hostile) -> None:
    img = hostile.image
    hostile.index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": img.manifest_digest,
                    "size": len(img.manifest),
                    "platform": {"os": "plan9", "architecture": "mips"},
                }
            ],
        }
    ).encode()
    with pytest.raises(ImageNotFound, match="plan9/mips"):
        resolve(_source(hostile))


def test_unknown_media_types(hostile: Hostile) -> None:
    hostile.manifest_type = "application/x-who-knows"
    with pytest.raises(InvalidImage, match="not an image manifest"):
        resolve(_source(hostile))
    hostile.manifest_type = OCI_MANIFEST
    doc = json.loads(hostile.image.manifest)
    doc["layers"][0]["mediaType"] = "application/x-mystery-layer"
    hostile.image = Image(
        hostile.image.layer, hostile.image.diff_id, hostile.image.config, json.dumps(doc).encode()
    )
    with pytest.raises(InvalidImage, match="layer 0"):
        resolve(_source(hostile))


def test_layer_sizes_negative_or_absurd(hostile: Hostile, store) -> None:
    hostile.image = make_image(layer_size=-5)
    with pytest.raises(InvalidImage, match="negative"):
        resolve(_source(hostile))
    hostile.image = img = make_image(layer_size=1 << 60)
    base = _base(hostile)
    with pytest.raises(DigestMismatch):
        base.fetch(store, img.layer_digest)
    _nothing_partial(store)


@pytest.mark.parametrize(
    "config",
    [
        {"config": "not an object"},
        {"config": {"Labels": ["a", "b"]}},
        {"config": {"Env": "PATH=/bin"}},
        {"config": {"Cmd": [1, 2]}},
        {"architecture": 12},
        {"history": {"created_by": "x"}},
    ],
)
def test_a_base_config_with_absurd_fields_is_invalid_image(hostile: Hostile, config: dict[str, Any]) -> None:
    hostile.image = make_image(config=config)
    with pytest.raises(InvalidImage):
        check_base_config(resolve(_source(hostile)))


def test_a_base_config_with_absurd_fields_through_the_cli(
    hostile: Hostile, capsys, tmp_path: Path, monkeypatch
) -> None:
    hostile.image = make_image(config={"config": {"Labels": ["not", "a", "map"]}})
    top, snap = tmp_path / "base-top", tmp_path / "snap"
    for d in (top, snap):
        d.mkdir()
    (snap / "file").write_bytes(b"x")
    monkeypatch.setenv("BLOBCHAIN_STORE", str(tmp_path / "store"))
    rc, err = _cli(
        capsys, "export", str(snap), "--oci", str(tmp_path / "oci"), "--base", hostile.ref,
        "--base-snapshot", str(top), "--insecure", "--label", "k=v", "-q",
    )  # fmt: skip
    assert rc == 2
    _one_line(err, "invalid_image")


def test_an_upload_location_on_another_host_gets_no_credentials(hostile: Hostile) -> None:
    # distribution's and containerd's authorizers add credentials per host they were
    # challenged by; an upload Location elsewhere is sent the bytes, not the password
    other = Hostile(host="127.0.0.2")
    blob = b"some blob bytes"
    digest = _digest(blob)
    try:
        hostile.on(
            lambda h: (
                "Authorization" not in h.headers
                and (h.answer(401, b"", {"WWW-Authenticate": 'Basic realm="x"'}) or True)
            )
        )
        hostile.on(
            lambda h: (
                h.command == "POST"
                and (h.answer(202, b"", {"Location": f"{other.url}/upload/1?_state=abc"}) or True)
            )
        )
        other.on(
            lambda h: h.command == "PUT" and (h.answer(201, b"", {"Docker-Content-Digest": digest}) or True)
        )
        with RegistryClient(
            parse_reference(hostile.ref), FAST, credentials=Credentials("u", SECRET, "", "test")
        ) as c:
            c.upload(digest, len(blob), lambda off: io.BytesIO(blob[off:]))
        assert [m for m, _, _ in other.requests] == ["PUT"]
        assert all("Authorization" not in hdrs for _, _, hdrs in other.requests)
        assert hostile.count("POST", "/blobs/uploads/") >= 1
    finally:
        other.close()
