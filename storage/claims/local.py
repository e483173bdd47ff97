"""Local single-flight claims: ``flock`` on one file per key, across threads and processes.

Each acquisition opens its own file description and takes ``LOCK_EX | LOCK_NB`` on it, so two
threads of one process conflict just as two processes do. Liveness is the kernel's job: the lock
lives exactly as long as the holder's file description, so a SIGKILLed holder's claim is free at
once and ``ttl_s`` is accepted only for interface compatibility. The holder's token is written
into the file so :meth:`LocalClaimService.holder` can report it.

Lock files are never unlinked (unlinking races with a concurrent open); they are a few bytes
each under ``<state_dir>/locks/``. A forked child shares its parent's file descriptions, and with
them any claim the parent holds: release claims before forking workers.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import uuid
from pathlib import Path

from blobchain.layers.errors import InvalidArgument
from blobchain.storage.claims import ClaimLost

__all__ = ["LocalClaim", "LocalClaimService"]

_TOKEN_BYTES = 32  # uuid4().hex


class LocalClaim:
    """A held ``flock``; ``release()`` is idempotent."""

    def __init__(self, key: str, token: str, path: Path, fd: int) -> None:
        self._key = key
        self._token = token
        self._path = path
        self._fd: int | None = fd
        st = os.fstat(fd)
        self._ident = (st.st_dev, st.st_ino)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalClaim(key={self._key!r}, token={self._token!r}, held={self._fd is not None})"

    @property
    def key(self) -> str:
        return self._key

    @property
    def token(self) -> str:
        return self._token

    def _still_ours(self, fd: int) -> bool:
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            return False
        if (st.st_dev, st.st_ino) != self._ident:
            return False
        return os.pread(fd, _TOKEN_BYTES + 1, 0).decode("ascii", "replace") == self._token

    def refresh(self) -> None:
        """Nothing to extend (the kernel holds the lock); check the claim is still ours."""
        with self._lock:
            if self._fd is None:
                raise ClaimLost(f"claim on {self._key!r} was released", key=self._key)
            if not self._still_ours(self._fd):
                raise ClaimLost(f"lock file of {self._key!r} was replaced", key=self._key)

    def release(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            try:
                if self._still_ours(fd):
                    os.ftruncate(fd, 0)  # no token: holder() reports nobody
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __enter__(self) -> LocalClaim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class LocalClaimService:
    """:class:`~blobchain.storage.claims.ClaimService` for one machine (lock files under ``state_dir``)."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.lock_dir = Path(state_dir) / "locks"
        self.lock_dir.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalClaimService({str(self.lock_dir)!r})"

    def _path(self, key: str) -> Path:
        if not isinstance(key, str) or not key:
            raise InvalidArgument(f"invalid lock key {key!r}")
        return self.lock_dir / (hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest() + ".lock")

    def try_acquire(self, key: str, ttl_s: float) -> LocalClaim | None:
        if not ttl_s > 0:
            raise InvalidArgument(f"claim ttl must be positive, got {ttl_s!r}", key=key)
        path = self._path(key)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            # Someone may have removed or replaced the file between our open and flock: then we
            # hold a lock nobody else can see; start again on the current file.
            st = os.fstat(fd)
            try:
                cur = os.stat(path)
            except FileNotFoundError:
                cur = None
            if cur is not None and (cur.st_dev, cur.st_ino) == (st.st_dev, st.st_ino):
                break
            os.close(fd)
        token = uuid.uuid4().hex
        try:
            # One pwrite overwrites a dead holder's token whole (tokens have a fixed length).
            os.pwrite(fd, token.encode("ascii"), 0)
            os.ftruncate(fd, len(token))
            return LocalClaim(key, token, path, fd)
        except BaseException:
            os.close(fd)
            raise

    def holder(self, key: str) -> str | None:
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            token = os.pread(fd, _TOKEN_BYTES + 1, 0).decode("ascii", "replace")
            if not token:
                return None
            # Probe for a live holder. Only reached when a token is present, so the brief shared
            # lock can make a racing try_acquire miss only a claim that was held or stale.
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return token  # held: the token is the holder's
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None  # a dead holder's leftover token
        finally:
            os.close(fd)
