"""How a chain computation runs, whatever the transport: the Job and Executor roles and the
records they hand back. Implementations: ``workers.embedded`` and ``tasks.submit``."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from blobchain.layers.errors import BlobchainError
from blobchain.layers.records import LayerBlob, LayerOptions, RefRecord

__all__ = ["ChainResult", "Executor", "Job", "JobState", "RefEvent"]

# Ref states, in the order a ref moves through them.
QUEUED, RUNNING, WAITING, BUILT, CONVERTED, CACHED, FAILED = (
    "queued",
    "running",
    "waiting",
    "built",
    "converted",
    "cached",
    "failed",
)
FINISHED = frozenset({BUILT, CONVERTED, CACHED, FAILED})


@dataclass(frozen=True)
class RefEvent:
    ref_id: str
    state: str
    files: int = 0
    bytes: int = 0
    error: dict[str, Any] | None = None
    # Why this ref is being built again, e.g. taken over after its holder died (distributed).
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ChainResult:
    """A finished chain: the records of the ref and its ancestors, base first."""

    ref_id: str
    records: tuple[RefRecord, ...]
    options: LayerOptions = field(default_factory=LayerOptions)

    def layer_blobs(self) -> list[LayerBlob]:
        """Each layer's blob in the requested compression if stored, else its main blob."""
        out = []
        for rec in self.records:
            blob = rec.blob_for(self.options) or rec.blob
            assert blob is not None
            out.append(blob)
        return out

    def to_dict(self) -> dict[str, Any]:
        layers = []
        for rec, blob in zip(self.records, self.layer_blobs(), strict=True):
            layers.append(
                {
                    "ref": rec.ref_id,
                    "parent": rec.parent,
                    "snapshot": rec.spec.snapshot,
                    "diff_id": blob.diff_id,
                    "digest": blob.digest,
                    "size": blob.size,
                    "media_type": blob.media_type,
                    "compressor": blob.compressor,
                    "chain_id": rec.chain_id,
                    "blob_chain_id": rec.blob_chain_id,
                }
            )
        return {"ref": self.ref_id, "layers": layers}


class JobState:
    """Per-ref progress shared by a job's producers and its readers (thread-safe)."""

    def __init__(self, ref_ids: list[str]) -> None:
        self._lock = threading.Lock()
        self._latest = {r: RefEvent(r, QUEUED) for r in ref_ids}
        self._queue: queue.Queue[RefEvent | None] = queue.Queue()
        self._done = threading.Event()

    def update(self, ev: RefEvent) -> None:
        with self._lock:
            if ev.ref_id not in self._latest:
                return
            prev = self._latest[ev.ref_id]
            if prev.state in FINISHED and ev.state not in FINISHED:
                return  # late progress after the end
            # A state change without counts keeps the last counts seen.
            ev = replace(ev, files=ev.files or prev.files, bytes=ev.bytes or prev.bytes)
            self._latest[ev.ref_id] = ev
        self._queue.put(ev)

    def finish(self) -> None:
        self._done.set()
        self._queue.put(None)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def snapshot(self) -> dict[str, RefEvent]:
        with self._lock:
            return dict(self._latest)

    def events(self, timeout: float | None = None) -> Iterator[RefEvent]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                ev = self._queue.get(timeout=left)
            except queue.Empty:
                return
            if ev is None:
                self._queue.put(None)  # let other readers see the end too
                return
            yield ev


@runtime_checkable
class Job(Protocol):
    @property
    def ref_id(self) -> str: ...

    def wait(self, timeout: float | None = None) -> ChainResult:
        """Block until the chain is done; raises the first ref's BlobchainError, or TimeoutError."""
        ...

    def done(self) -> bool: ...

    def progress(self) -> dict[str, RefEvent]:
        """Latest state of every ref of the chain."""
        ...

    def events(self, timeout: float | None = None) -> Iterator[RefEvent]: ...


@runtime_checkable
class Executor(Protocol):
    def submit(
        self, ref_id: str, opts: LayerOptions, *, create_if_needed: bool = True, force: bool = False
    ) -> Job: ...

    def close(self, *, cancel: bool = False) -> None:
        """Release the executor; ``cancel`` (Ctrl-C): stop builds running here rather than wait."""
        ...


def error_dict(e: BaseException) -> dict[str, Any]:
    if isinstance(e, BlobchainError):
        return e.to_dict()
    return {"code": "internal", "message": f"{type(e).__name__}: {e}", "details": {}}
