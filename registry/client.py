"""One registry repository over the OCI distribution API (httpx, HTTP/1.1, sync, thread-safe).

Operations: ping, ``HEAD`` a blob, cross-repository mount, monolithic upload (``POST`` then one
``PUT`` with the body), chunked upload (``PATCH`` chunks; after a dropped connection, ``GET`` the
upload's status and go on from the ``Range`` the registry reports), manifests.

Auth: a request answered ``401`` is retried once with what its ``WWW-Authenticate`` asks for:
Basic (the credentials), or Bearer (a token from the realm for the scopes this client needs plus
the challenge's). Tokens are kept per scope set. Bodies are factories, so a retried request sends
its body again from the start.

Retries (tenacity) are bounded and only for what can pass: connection errors, 5xx, 429.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import httpx
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential, wait_random

from blobchain.layers.errors import BlobchainError, Cancelled, InvalidArgument
from blobchain.registry.auth import Challenge, Credentials, find_credentials, parse_challenge
from blobchain.registry.errors import (
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    RegistryError,
    RegistryProtocolError,
    RegistryTLSError,
    RegistryUnavailable,
    Unauthorized,
    from_response,
    redact,
    safe_url,
)
from blobchain.registry.reference import Reference, is_loopback

__all__ = ["Answer", "RegistryClient", "TransportOptions", "UploadStats"]

_READ = 1 << 20
_ERROR_BODY = 64 << 10  # what is read of an error answer, for its message
_TOKEN = re.compile(r"^[\x21-\x7e]{1,65536}$")
_REDIRECTS = 10  # as Go's http.Client (docker, containerd)
Body = bytes | Callable[[], Iterable[bytes]] | None


@dataclass(frozen=True)
class Answer:
    """A registry's answer, its body read (bounded) and the connection released."""

    status_code: int
    headers: httpx.Headers
    content: bytes
    url: httpx.URL
    method: str


@dataclass(frozen=True)
class TransportOptions:
    """How to reach a registry. ``insecure``: plain HTTP or unverified TLS, only for loopback
    hosts unless ``insecure_remote``. ``ca``: a PEM bundle trusted besides the system's."""

    ca: str | None = None
    insecure: bool = False
    insecure_remote: bool = False
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 120.0
    attempts: int = 5
    # Blobs up to this size go in one PUT; larger ones in PATCH chunks of chunk_size.
    monolithic_max: int = 64 << 20
    chunk_size: int = 64 << 20
    jobs: int = 4
    # A manifest, index or token answer bigger than this is refused unread (a hostile or broken
    # registry must not fill memory); error bodies are read up to _ERROR_BODY only.
    max_manifest: int = 4 << 20
    # The first retry waits about this long, doubling per attempt (tests shorten it).
    backoff_s: float = 0.2


@dataclass
class UploadStats:
    sent: int = 0
    resumed: int = 0
    restarted: int = 0


def _retryable(e: BaseException) -> bool:
    return isinstance(e, BlobchainError) and e.retryable


class RegistryClient:
    """A client for ``ref.repository`` on ``ref.registry``. ``scopes`` are the extra token
    scopes a push needs (e.g. ``repository:other:pull`` for mounts)."""

    def __init__(
        self,
        ref: Reference,
        options: TransportOptions | None = None,
        *,
        credentials: Credentials | None = None,
        mount_from: Iterable[str] = (),
        cancel: threading.Event | None = None,
        push: bool = True,
    ) -> None:
        self.ref = ref
        self.options = opts = options or TransportOptions()
        if opts.insecure and not (opts.insecure_remote or is_loopback(ref.hostname)):
            raise InvalidArgument(
                f"--insecure is only for local registries; {ref.registry} is not loopback "
                "(add --insecure-remote to allow it)",
                registry=ref.registry,
            )
        self._creds = credentials if credentials is not None else find_credentials(ref)
        # A pull (a base image) asks only for pull: a read-only token must do.
        self._scopes = [f"repository:{ref.repository}:{'pull,push' if push else 'pull'}"] + [
            f"repository:{r}:pull" for r in mount_from if r != ref.repository
        ]
        self._cancel = cancel or threading.Event()
        verify: ssl.SSLContext | bool
        if opts.insecure:
            verify = False
        else:
            verify = ssl.create_default_context()
            if opts.ca:
                try:
                    verify.load_verify_locations(cafile=opts.ca)
                except (OSError, ssl.SSLError) as e:
                    raise InvalidArgument(f"cannot load --ca {opts.ca}: {e}", ca=opts.ca) from None
        self._http = httpx.Client(
            verify=verify,
            timeout=httpx.Timeout(opts.read_timeout_s, connect=opts.connect_timeout_s),
            limits=httpx.Limits(max_connections=opts.jobs + 4, max_keepalive_connections=opts.jobs + 4),
            follow_redirects=True,
            max_redirects=_REDIRECTS,
            trust_env=False,  # proxies and netrc from the environment are not ours to pick up
            event_hooks={"request": [self._no_downgrade]},
        )
        self._lock = threading.Lock()
        self._auth: str | None = None  # the Authorization header value, never printed
        self._challenge: Challenge | None = None
        self._base: str | None = None

    def __repr__(self) -> str:
        return f"RegistryClient({self.ref.registry}/{self.ref.repository})"

    def _no_downgrade(self, request: httpx.Request) -> None:
        # Every request, redirects included (httpx runs request hooks per hop): once the registry
        # is reached over TLS, nothing of it (blobs, tokens) is fetched in plain text, unless
        # --insecure. Authorization is already dropped by httpx on a hop to another origin.
        if (
            not self.options.insecure
            and self._base is not None
            and self._base.startswith("https://")
            and request.url.scheme != "https"
        ):
            raise RegistryProtocolError(
                f"registry {self.ref.registry} (TLS) sent blobchain to plain-text "
                f"{safe_url(str(request.url))}; refused (--insecure allows it for a local registry)"
            )

    def _own(self, url: str) -> bool:
        """Whether ``url`` is on the registry itself (scheme, host and port): the registry's
        credentials go nowhere else, whatever Location it hands out (as docker's and containerd's
        authorizers, which add them per host they were challenged by)."""
        if self._base is None:
            return False
        mine, there = httpx.URL(self._base), httpx.URL(url)
        return (mine.scheme, mine.host, mine.port) == (there.scheme, there.host, there.port)

    def _secrets(self) -> list[str]:
        """What must never appear in a message: the password, tokens, Authorization values."""
        out = [self._auth or ""]
        if self._auth and " " in self._auth:
            out.append(self._auth.split(" ", 1)[1])
        if self._creds is not None:
            out += [self._creds.password, self._creds.identity_token]
            if self._creds.username or self._creds.password:
                out.append(self._creds.basic().split(" ", 1)[1])
        return [s for s in out if len(s) >= 4]

    def _error(self, status: int, body: bytes, what: str, url: str) -> RegistryError:
        """The registry's named error; a registry echoing our credentials gets them masked."""
        e = from_response(status, body, what, url)
        clean = redact(e.message, self._secrets())
        if clean != e.message:
            e.message = clean
            e.args = (clean,)
        return e

    def _send(
        self,
        method: str,
        url: str,
        *,
        what: str,
        content: bytes | Iterable[bytes] | None = None,
        headers: dict[str, str] | None = None,
        params: httpx.QueryParams | dict[str, str] | None = None,
        data: dict[str, str] | None = None,
    ) -> httpx.Response:
        """One exchange, redirects followed, the body not read yet; httpx's errors as named ones."""
        try:
            req = self._http.build_request(
                method, url, content=content, headers=headers, params=params, data=data
            )
            return self._http.send(req, stream=True)
        except httpx.UnsupportedProtocol as e:
            raise RegistryProtocolError(f"{what}: {_reason(e)} (from {safe_url(url)})") from None
        except httpx.TooManyRedirects:
            raise RegistryProtocolError(
                f"{what}: more than {_REDIRECTS} redirects from {safe_url(url)}"
            ) from None
        except httpx.TransportError as e:
            raise self._unreachable(what, url, e) from None
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            raise RegistryProtocolError(f"{what}: {_reason(e)} (from {safe_url(url)})") from None

    def _body(self, resp: httpx.Response, what: str, limit: int, *, truncate: bool = False) -> bytes:
        """The response body, at most ``limit`` bytes (more: RegistryProtocolError, or with
        ``truncate`` the first ``limit``); the connection is released either way."""
        parts: list[bytes] = []
        got = 0
        try:
            declared = resp.headers.get("content-length", "")
            if (
                resp.request.method != "HEAD"
                and declared.isdigit()
                and int(declared) > limit
                and not truncate
            ):
                raise RegistryProtocolError(
                    f"{what}: the registry's answer is {declared} bytes, over the {limit} allowed"
                )
            for chunk in resp.iter_bytes():
                got += len(chunk)
                if got > limit:
                    if truncate:
                        parts.append(chunk[: len(chunk) - (got - limit)])
                        break
                    raise RegistryProtocolError(
                        f"{what}: the registry's answer is over the {limit} bytes allowed"
                    )
                parts.append(chunk)
        except httpx.TransportError as e:
            raise self._unreachable(what, str(resp.url), e) from None
        except httpx.HTTPError as e:
            raise RegistryProtocolError(f"{what}: {_reason(e)} ({safe_url(str(resp.url))})") from None
        finally:
            resp.close()
        return b"".join(parts)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transport ----------------------------------------------------------------------------

    def retrying(self) -> Retrying:
        return Retrying(
            stop=stop_after_attempt(self.options.attempts),
            wait=wait_exponential(multiplier=self.options.backoff_s, max=5.0)
            + wait_random(0, self.options.backoff_s),
            retry=retry_if_exception(_retryable),
            reraise=True,
        )

    @property
    def base(self) -> str:
        if self._base is None:
            self.ping()
        assert self._base is not None
        return self._base

    def ping(self) -> None:
        """Find the scheme (https; http too for ``insecure``) and the auth challenge (``GET /v2/``)."""
        schemes = ["https", "http"] if self.options.insecure else ["https"]
        last: BaseException | None = None
        for attempt in self.retrying():
            with attempt:
                for scheme in schemes:
                    url = f"{scheme}://{self.ref.host}/v2/"
                    try:
                        resp = self._http.send(self._http.build_request("GET", url), stream=True)
                    except httpx.ConnectError as e:
                        last = e
                        if "SSL" in str(e) or "ssl" in str(e).lower():
                            if scheme == schemes[-1]:
                                raise RegistryTLSError(
                                    f"TLS to {self.ref.registry} failed: {_reason(e)} (use --ca FILE for a private "
                                    "CA, or --insecure for a local test registry)"
                                ) from None
                            continue
                        if scheme == schemes[-1]:
                            raise self._unreachable("ping", url, e) from None
                        continue
                    except httpx.TransportError as e:
                        last = e
                        if scheme == schemes[-1]:
                            raise self._unreachable("ping", url, e) from None
                        continue
                    except httpx.TooManyRedirects:
                        raise RegistryProtocolError(
                            f"ping: more than {_REDIRECTS} redirects from {url}"
                        ) from None
                    except (httpx.HTTPError, httpx.InvalidURL) as e:
                        raise RegistryProtocolError(f"ping: {_reason(e)} (from {url})") from None
                    body = self._body(resp, "ping", _ERROR_BODY, truncate=True)
                    if resp.status_code in (200, 401):
                        self._base = f"{scheme}://{self.ref.host}"
                        if resp.status_code == 401:
                            self._challenge = parse_challenge(resp.headers.get("www-authenticate", ""))
                            self._authorize(self._challenge, ())
                        return
                    if resp.status_code == 404:
                        raise RegistryProtocolError(f"{url} is not an OCI distribution API (404 on /v2/)")
                    raise self._error(resp.status_code, body, "ping", url)
        raise self._unreachable("ping", self.ref.registry, last)

    def _unreachable(self, what: str, url: str, e: BaseException | None) -> RegistryUnavailable:
        return RegistryUnavailable(f"{what}: registry {safe_url(url)} unreachable: {_reason(e)}")

    def _authorize(self, challenge: Challenge | None, extra_scopes: Iterable[str]) -> None:
        if challenge is None:
            raise Unauthorized(
                f"registry {self.ref.registry} asks for authentication without a usable challenge"
            )
        if challenge.scheme == "basic":
            if self._creds is None:
                raise Unauthorized(
                    f"registry {self.ref.registry} needs credentials (docker login / REGISTRY_AUTH_FILE / "
                    "BLOBCHAIN_REGISTRY_USERNAME+PASSWORD)"
                )
            self._auth = self._creds.basic()
            return
        scopes = list(dict.fromkeys([*self._scopes, *challenge.scopes, *extra_scopes]))
        self._auth = "Bearer " + self._token(challenge, scopes)

    def _token(self, challenge: Challenge, scopes: list[str]) -> str:
        if not challenge.realm.startswith(("https://", "http://")):
            raise Unauthorized(f"registry {self.ref.registry}: bearer challenge without a usable realm")
        creds = self._creds
        params: list[tuple[str, str | int | float | bool | None]] = []
        if challenge.service:
            params.append(("service", challenge.service))
        params += [("scope", s) for s in scopes]
        sends_secret = creds is not None and bool(creds.identity_token or creds.username or creds.password)
        if (
            sends_secret
            and not self.options.insecure
            and challenge.realm.startswith("http://")
            and (self._base or "https://").startswith("https://")
        ):
            # docker and containerd send credentials to the realm on whatever host it names
            # (Docker Hub's is auth.docker.io), and so does blobchain; not in plain text, though,
            # when the registry itself is reached over TLS.
            raise Unauthorized(
                f"registry {self.ref.registry}: its token realm {safe_url(challenge.realm)} is plain http; "
                "refusing to send credentials there (--insecure allows it for a local registry)"
            )
        if creds is not None and creds.identity_token:
            # OAuth2 refresh-token grant (what `docker login` stores as identitytoken)
            form = {
                "grant_type": "refresh_token",
                "refresh_token": creds.identity_token,
                "client_id": "blobchain",
                "scope": " ".join(scopes),
            }
            if challenge.service:
                form["service"] = challenge.service
            resp = self._send("POST", challenge.realm, what="token", data=form)
        else:
            headers = {"Authorization": creds.basic()} if creds is not None and creds.username else {}
            resp = self._send(
                "GET", challenge.realm, what="token", params=httpx.QueryParams(params), headers=headers
            )
        if resp.status_code != 200:
            body = self._body(resp, "token", _ERROR_BODY, truncate=True)
        else:
            body = self._body(resp, f"token service {safe_url(challenge.realm)}", self.options.max_manifest)
        if resp.status_code in (401, 403):
            who = (
                f"as {creds.username!r} ({creds.source})"
                if creds is not None and creds.username
                else "anonymously"
            )
            raise Unauthorized(
                f"token service {safe_url(challenge.realm)} refused {who} for {' '.join(scopes)} ({resp.status_code})",
                status=resp.status_code,
            )
        if resp.status_code != 200:
            raise self._error(resp.status_code, body, "token", challenge.realm)
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            data = None
        token = (data.get("token") or data.get("access_token")) if isinstance(data, dict) else None
        if not token:
            raise Unauthorized(f"token service {safe_url(challenge.realm)} answered without a token")
        # It goes into a header: a value that is not visible ASCII would be refused by the HTTP
        # library with the value in its message.
        if not isinstance(token, str) or not _TOKEN.match(token):
            raise Unauthorized(f"token service {safe_url(challenge.realm)} answered with a malformed token")
        return token

    def request(
        self,
        method: str,
        url: str,
        *,
        what: str,
        ok: tuple[int, ...],
        body: Body = None,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        absent: tuple[int, ...] = (),
    ) -> Answer | None:
        """Send once (plus one re-authorized send on 401); a status in ``absent`` returns None,
        one not in ``ok`` raises the registry's named error, a transport error RegistryUnavailable.
        Bodies are read up to ``options.max_manifest`` bytes (error bodies up to 64 KiB)."""
        if not url.startswith(("http://", "https://")):
            url = self.base + url
        for auth_round in range(2):
            if self._cancel.is_set():
                raise Cancelled("push cancelled")
            hdrs = dict(headers or {})
            if self._auth and self._own(url):
                hdrs["Authorization"] = self._auth
            content = body() if callable(body) else body
            resp = self._send(method, url, what=what, content=content, headers=hdrs, params=params)
            if resp.status_code == 401 and auth_round == 0:
                resp.close()
                challenge = parse_challenge(resp.headers.get("www-authenticate", ""))
                with self._lock:
                    self._authorize(challenge, ())
                continue
            if resp.status_code in absent:
                resp.close()
                return None
            if resp.status_code not in ok:
                raise self._error(
                    resp.status_code, self._body(resp, what, _ERROR_BODY, truncate=True), what, url
                )
            data = self._body(resp, what, self.options.max_manifest)
            return Answer(resp.status_code, resp.headers, data, resp.url, method)
        raise AssertionError("unreachable")

    def _path(self, kind: str, ref: str = "") -> str:
        return f"/v2/{self.ref.repository}/{kind}/{ref}"

    # --- blobs --------------------------------------------------------------------------------

    def blob_size(self, digest: str) -> int | None:
        """The blob's size if the repository has it (``HEAD``), else None."""
        for attempt in self.retrying():
            with attempt:
                resp = self.request(
                    "HEAD", self._path("blobs", digest), what=f"HEAD {digest}", ok=(200,), absent=(404,)
                )
                if resp is None:
                    return None
                return int(resp.headers.get("content-length", "-1"))
        raise AssertionError("unreachable")

    def open_blob(self, digest: str, offset: int = 0) -> BinaryIO:
        """A streaming reader over the blob's bytes (``GET``, redirects followed), from
        ``offset`` on (a ``Range`` request). Not verified here: callers wrap it."""
        url = self.base + self._path("blobs", digest)
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        for attempt in self.retrying():
            with attempt:
                for auth_round in range(2):
                    if self._cancel.is_set():
                        raise Cancelled("pull cancelled")
                    hdrs = dict(headers)
                    if self._auth:
                        hdrs["Authorization"] = self._auth
                    resp = self._send("GET", url, what=f"GET {digest}", headers=hdrs)
                    if resp.status_code == 401 and auth_round == 0:
                        resp.close()
                        with self._lock:
                            self._authorize(parse_challenge(resp.headers.get("www-authenticate", "")), ())
                        continue
                    if resp.status_code not in ((200, 206) if offset else (200,)):
                        body = self._body(resp, f"GET {digest}", _ERROR_BODY, truncate=True)
                        raise self._error(resp.status_code, body, f"GET {digest}", url)
                    if resp.status_code == 206 and _range_start(resp) != offset:
                        # bytes from elsewhere in the blob would be appended as if they followed
                        resp.close()
                        raise RegistryProtocolError(
                            f"GET {digest} from byte {offset}: the registry sent Content-Range "
                            f"{resp.headers.get('content-range', '')[:80]!r} ({safe_url(url)})"
                        )
                    reader = _ResponseReader(resp, self._cancel)
                    if offset and resp.status_code == 200:  # the Range was ignored: skip ahead
                        left = offset
                        buf = bytearray(min(_READ, offset))
                        while left > 0:
                            n = reader.readinto(memoryview(buf)[: min(len(buf), left)])
                            if n == 0:
                                raise RegistryProtocolError(f"blob {digest} ended before offset {offset}")
                            left -= n
                    return reader  # type: ignore[return-value]
        raise AssertionError("unreachable")

    def get_manifest(self, reference: str, accept: Iterable[str]) -> tuple[bytes, str]:
        """A manifest or index by tag or digest: (bytes, media type the registry gives)."""
        for attempt in self.retrying():
            with attempt:
                resp = self.request(
                    "GET",
                    self._path("manifests", reference),
                    what=f"manifest {reference}",
                    ok=(200,),
                    headers={"Accept": ", ".join(accept)},
                )
                assert resp is not None
                media_type = resp.headers.get("content-type", "").split(";")[0].strip()
                return resp.content, media_type
        raise AssertionError("unreachable")

    def mount(self, digest: str, from_repo: str) -> str | None:
        """Mount ``digest`` from ``from_repo``; None if mounted, else the upload location the
        registry opened instead (usable for the upload)."""
        for attempt in self.retrying():
            with attempt:
                resp = self.request(
                    "POST",
                    self._path("blobs", "uploads/"),
                    what=f"mount {digest} from {from_repo}",
                    ok=(201, 202),
                    params={"mount": digest, "from": from_repo},
                )
                assert resp is not None
                return None if resp.status_code == 201 else self._location(resp)
        raise AssertionError("unreachable")

    def start_upload(self) -> str:
        for attempt in self.retrying():
            with attempt:
                resp = self.request("POST", self._path("blobs", "uploads/"), what="start upload", ok=(202,))
                assert resp is not None
                return self._location(resp)
        raise AssertionError("unreachable")

    def _location(self, resp: Answer) -> str:
        loc = resp.headers.get("location")
        if not loc:
            raise RegistryProtocolError(
                f"registry gave no Location for {resp.method} {safe_url(str(resp.url))}"
            )
        return str(resp.url.join(loc))

    def upload(
        self,
        digest: str,
        size: int,
        open_at: Callable[[int], BinaryIO],
        *,
        location: str | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> UploadStats:
        """Upload one blob from ``open_at(offset)`` (a reader positioned at ``offset``)."""
        stats = UploadStats()
        if size <= self.options.monolithic_max:
            for attempt in self.retrying():
                with attempt:
                    loc = location or self.start_upload()
                    location = None  # a failed attempt's session is not reused
                    self._put_whole(digest, size, open_at, loc, stats, on_bytes)
            return stats
        self._chunked(digest, size, open_at, location, stats, on_bytes)
        return stats

    def _stream(
        self,
        open_at: Callable[[int], BinaryIO],
        offset: int,
        length: int,
        stats: UploadStats,
        on_bytes: Callable[[int], None] | None,
    ) -> Callable[[], Iterator[bytes]]:
        def gen() -> Iterator[bytes]:
            with open_at(offset) as f:
                left = length
                while left > 0:
                    if self._cancel.is_set():
                        raise Cancelled("push cancelled")
                    chunk = f.read(min(_READ, left))
                    if not chunk:
                        raise RegistryProtocolError(
                            f"source ended {left} bytes early at offset {offset + length - left}"
                        )
                    left -= len(chunk)
                    stats.sent += len(chunk)
                    if on_bytes:
                        on_bytes(len(chunk))
                    yield chunk

        return gen

    def _put_whole(
        self,
        digest: str,
        size: int,
        open_at: Callable[[int], BinaryIO],
        loc: str,
        stats: UploadStats,
        on_bytes: Callable[[int], None] | None,
    ) -> None:
        resp = self.request(
            "PUT",
            str(httpx.URL(loc).copy_merge_params({"digest": digest})),
            what=f"upload {digest}",
            ok=(201,),
            body=self._stream(open_at, 0, size, stats, on_bytes),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
        )
        assert resp is not None
        self._check_digest(resp, digest)

    def _check_digest(self, resp: Answer, digest: str) -> None:
        got = resp.headers.get("docker-content-digest")
        if got and got != digest:
            raise DigestInvalid(f"registry stored {got} for {digest}", status=resp.status_code)

    def _status(self, loc: str, acknowledged: int) -> tuple[str, int] | None:
        """``GET`` the upload: (location, bytes it holds), or None if the session is gone.
        ``acknowledged``: what the last accepted chunk left (disambiguates a ``0-0`` Range)."""
        for attempt in self.retrying():
            with attempt:
                try:
                    resp = self.request("GET", loc, what="upload status", ok=(204,))
                except (BlobUploadInvalid, BlobUploadUnknown):
                    return None
                assert resp is not None
                end = _range_end(resp)
                return self._location(resp), 0 if end == 0 and acknowledged == 0 else end + 1
        raise AssertionError("unreachable")

    def _chunked(
        self,
        digest: str,
        size: int,
        open_at: Callable[[int], BinaryIO],
        location: str | None,
        stats: UploadStats,
        on_bytes: Callable[[int], None] | None,
    ) -> None:
        failures = 0
        restarted_digest = False
        loc = location or self.start_upload()
        offset = 0
        while True:
            try:
                while offset < size:
                    n = min(self.options.chunk_size, size - offset)
                    resp = self.request(
                        "PATCH",
                        loc,
                        what=f"upload {digest} bytes {offset}-{offset + n - 1}",
                        ok=(202,),
                        body=self._stream(open_at, offset, n, stats, on_bytes),
                        headers={
                            "Content-Type": "application/octet-stream",
                            "Content-Length": str(n),
                            "Content-Range": f"{offset}-{offset + n - 1}",
                        },
                    )
                    assert resp is not None
                    loc = self._location(resp)
                    end = _range_end(resp) + 1
                    if end != offset + n:
                        raise RegistryProtocolError(
                            f"registry holds {end} bytes of {digest}, expected {offset + n}"
                        )
                    offset = end
                resp = self.request(
                    "PUT",
                    str(httpx.URL(loc).copy_merge_params({"digest": digest})),
                    what=f"finish upload {digest}",
                    ok=(201,),
                    headers={"Content-Length": "0"},
                )
                assert resp is not None
                self._check_digest(resp, digest)
                return
            except (RegistryUnavailable, RegistryProtocolError) as e:
                failures += 1
                if failures >= self.options.attempts or not (
                    e.retryable or isinstance(e, RegistryProtocolError)
                ):
                    raise
                time.sleep(min(5.0, self.options.backoff_s * 2**failures))
                status = self._status(loc, offset)
                if status is None:  # the registry dropped the session (distribution does after a torn chunk)
                    loc, offset = self.start_upload(), 0
                    stats.restarted += 1
                else:
                    loc, offset = status
                    stats.resumed += 1
            except DigestInvalid:
                # A reported Range of "0-0" means 0 or 1 byte: the one case resuming can get wrong.
                if restarted_digest:
                    raise
                restarted_digest = True
                loc, offset = self.start_upload(), 0
                stats.restarted += 1

    # --- manifests ----------------------------------------------------------------------------

    def put_manifest(self, reference: str, media_type: str, data: bytes, digest: str) -> None:
        for attempt in self.retrying():
            with attempt:
                resp = self.request(
                    "PUT",
                    self._path("manifests", reference),
                    what=f"manifest {reference}",
                    ok=(201, 200),
                    body=data,
                    headers={"Content-Type": media_type},
                )
                assert resp is not None
                got = resp.headers.get("docker-content-digest")
                if got and got != digest:
                    raise RegistryProtocolError(f"registry stored manifest {got}, expected {digest}")

    def manifest_digest(self, reference: str, accept: Iterable[str]) -> str | None:
        for attempt in self.retrying():
            with attempt:
                resp = self.request(
                    "HEAD",
                    self._path("manifests", reference),
                    what=f"HEAD manifest {reference}",
                    ok=(200,),
                    absent=(404,),
                    headers={"Accept": ", ".join(accept)},
                )
                return None if resp is None else resp.headers.get("docker-content-digest")
        raise AssertionError("unreachable")


class _ResponseReader(io.RawIOBase):
    """A raw stream over a streamed response body (bytes as sent: no content decoding)."""

    def __init__(self, resp: httpx.Response, cancel: threading.Event) -> None:
        super().__init__()
        self._resp = resp
        # as the bytes arrive: a chunk size would buffer up to it, and a torn download would
        # lose what was buffered (the resume starts from what reached the reader)
        self._chunks = resp.iter_raw()
        self._pending = b""
        self._cancel = cancel

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        mv = memoryview(buffer).cast("B")
        if not self._pending:
            if self._cancel.is_set():
                raise Cancelled("pull cancelled")
            try:
                self._pending = next(self._chunks, b"")
            except httpx.TransportError as e:
                raise RegistryUnavailable(
                    f"blob download from {safe_url(str(self._resp.url))} broke: {_reason(e)}"
                ) from None
            except (httpx.HTTPError, httpx.StreamError) as e:
                raise RegistryProtocolError(
                    f"blob download from {safe_url(str(self._resp.url))} failed: {_reason(e)}"
                ) from None
        n = min(len(mv), len(self._pending))
        mv[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            self._resp.close()
            super().close()


def _range_end(resp: Answer) -> int:
    value = resp.headers.get("range", "")
    with contextlib.suppress(ValueError):
        start, _, end = value.removeprefix("bytes=").partition("-")
        if int(start) == 0:
            return int(end)
    raise RegistryProtocolError(f"registry sent no usable Range header ({value[:80]!r})")


def _range_start(resp: httpx.Response) -> int | None:
    """The first byte a 206's ``Content-Range: bytes START-END/TOTAL`` says it carries."""
    value = resp.headers.get("content-range", "")
    m = re.match(r"^bytes\s+(\d+)-\d+/(?:\d+|\*)$", value.strip())
    return int(m.group(1)) if m else None


def _reason(e: BaseException | None) -> str:
    if e is None:
        return "no answer"
    text = str(e) or type(e).__name__
    return text.split("\n")[0][:200]
