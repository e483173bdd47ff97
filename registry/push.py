"""Push an image (or an index with its images) to a registry, blobs first, manifests last.

For each unique blob, in parallel (at most ``jobs`` at once): ``HEAD`` it (skip if present),
else try a cross-repository mount from each ``mount_from`` repository (and the source's own
hints), else upload it. Then every blob is ``HEAD``-checked again, and only when all are present
are the manifests put: an index's images by digest, then the top one by tag. A failed or
interrupted push puts no manifest; a rerun skips what already arrived.

Where bytes come from is a :class:`BlobSource`: a local OCI layout (:class:`LayoutSource`) or
anything that can open a blob at an offset (the content store adapter in ``client/push.py``
streams from S3 with ranged GETs; nothing is staged on local disk).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

from blobchain.layers.errors import InvalidArgument, NotFound
from blobchain.layers.oci import INDEX_TYPES, REF_NAME
from blobchain.layers.records import Descriptor
from blobchain.registry.client import RegistryClient, TransportOptions
from blobchain.registry.errors import BlobUnknown, ManifestBlobUnknown
from blobchain.registry.reference import Reference

__all__ = [
    "BlobReport",
    "BlobSource",
    "LayoutSource",
    "PushEvent",
    "PushPlan",
    "PushResult",
    "push",
]



class BlobSource(Protocol):
    def open_at(self, digest: str, offset: int) -> BinaryIO:
        """A reader over the blob's bytes from ``offset`` on."""
        ...

    def mount_hints(self, registry: str, digest: str) -> Sequence[str]:
        """Repositories on ``registry`` this blob was pushed to before (mount candidates)."""
        ...

    def pushed(self, registry: str, repository: str, digests: Sequence[str]) -> None:
        """Remember where the blobs now are (for later mounts); best effort."""
        ...


@dataclass(frozen=True)
class PushPlan:
    """What to push: unique blobs, and manifests in push order (an index's images first, the
    tagged one last), each with its bytes."""

    blobs: tuple[Descriptor, ...]
    manifests: tuple[tuple[Descriptor, bytes], ...]

    @property
    def top(self) -> Descriptor:
        return self.manifests[-1][0]

    @classmethod
    def of(cls, manifests: Sequence[tuple[Descriptor, bytes]], blobs: Iterable[Descriptor]) -> PushPlan:
        seen: dict[str, Descriptor] = {}
        for b in blobs:
            seen.setdefault(b.digest, b)
        return cls(tuple(seen.values()), tuple(manifests))


@dataclass(frozen=True)
class PushEvent:
    """Progress of one blob or manifest: ``state`` is checking, exists (skipped), mounted,
    uploading, uploaded, verified or manifest; ``sent`` counts the bytes sent so far."""

    digest: str
    size: int
    state: str
    sent: int = 0
    media_type: str = ""


@dataclass(frozen=True)
class BlobReport:
    digest: str
    size: int
    action: str  # "exists" | "mounted" | "uploaded"
    sent: int = 0
    resumed: int = 0
    restarted: int = 0
    mounted_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class PushResult:
    reference: str
    digest: str
    media_type: str
    blobs: tuple[BlobReport, ...] = field(default_factory=tuple)
    manifests: tuple[str, ...] = ()

    @property
    def sent(self) -> int:
        return sum(b.sent for b in self.blobs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "digest": self.digest,
            "media_type": self.media_type,
            "manifests": list(self.manifests),
            "bytes_sent": self.sent,
            "blobs": [b.to_dict() for b in self.blobs],
        }


# --- a local OCI layout as the source ------------------------------------------------------


class LayoutSource:
    """Blobs of an OCI image layout; ``plan(tag)`` reads ``index.json`` and the manifests."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.fspath(root)
        if not os.path.isfile(os.path.join(self.root, "index.json")):
            raise NotFound(f"{self.root} is not an OCI layout (no index.json)", path=self.root)

    def _path(self, digest: str) -> str:
        algo, _, hexd = digest.partition(":")
        if algo != "sha256" or len(hexd) != 64 or not all(c in "0123456789abcdef" for c in hexd):
            raise InvalidArgument(f"invalid digest {digest!r} in layout", digest=digest)
        return os.path.join(self.root, "blobs", "sha256", hexd)

    def open_at(self, digest: str, offset: int) -> BinaryIO:
        try:
            f = open(self._path(digest), "rb")  # noqa: SIM115 (the caller closes it)
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is missing from {self.root}", digest=digest) from None
        f.seek(offset)
        return f

    def read(self, digest: str) -> bytes:
        with self.open_at(digest, 0) as f:
            return f.read()

    def mount_hints(self, registry: str, digest: str) -> Sequence[str]:
        return ()

    def pushed(self, registry: str, repository: str, digests: Sequence[str]) -> None:
        return None

    def plan(self, tag: str | None) -> PushPlan:
        with open(os.path.join(self.root, "index.json"), "rb") as f:
            index = json.load(f)
        entries = index.get("manifests") or []
        if tag is None:
            if len(entries) != 1:
                tags = sorted(m.get("annotations", {}).get(REF_NAME, "?") for m in entries)
                raise InvalidArgument(
                    f"{self.root} holds {len(entries)} images ({', '.join(tags)}): name one as DIR:TAG"
                )
            entry = entries[0]
        else:
            found = [m for m in entries if m.get("annotations", {}).get(REF_NAME) == tag]
            if not found:
                raise NotFound(f"no image tagged {tag!r} in {self.root}", tag=tag)
            entry = found[-1]
        return self._plan_for(_desc(entry))

    def _plan_for(self, top: Descriptor) -> PushPlan:
        manifests: list[tuple[Descriptor, bytes]] = []
        blobs: list[Descriptor] = []
        data = self.read(top.digest)
        doc = json.loads(data)
        if top.media_type in INDEX_TYPES or doc.get("manifests") is not None:
            for child in doc.get("manifests") or []:
                sub = self._plan_for(_desc(child))
                manifests += sub.manifests
                blobs += sub.blobs
        else:
            blobs.append(_desc(doc["config"]))
            blobs += [_desc(la) for la in doc.get("layers") or []]
        manifests.append((top, data))
        return PushPlan.of(manifests, blobs)


def _desc(d: dict[str, Any]) -> Descriptor:
    return Descriptor(str(d.get("mediaType", "")), str(d["digest"]), int(d["size"]))


# --- the push ------------------------------------------------------------------------------


def _push_blob(
    client: RegistryClient,
    source: BlobSource,
    blob: Descriptor,
    mount_from: Sequence[str],
    progress: Callable[[PushEvent], None],
) -> BlobReport:
    d, size = blob.digest, blob.size
    progress(PushEvent(d, size, "checking", media_type=blob.media_type))
    if client.blob_size(d) == size:
        progress(PushEvent(d, size, "exists", size, blob.media_type))
        return BlobReport(d, size, "exists")
    location: str | None = None
    hints = [
        r for r in (*mount_from, *source.mount_hints(client.ref.registry, d)) if r != client.ref.repository
    ]
    for repo in dict.fromkeys(hints):
        if location is not None:
            break
        loc = client.mount(d, repo)
        if loc is None:
            progress(PushEvent(d, size, "mounted", size, blob.media_type))
            return BlobReport(d, size, "mounted", mounted_from=repo)
        location = loc  # the registry opened an upload instead: use it
    sent = [0]

    def on_bytes(n: int) -> None:
        sent[0] += n
        progress(PushEvent(d, size, "uploading", sent[0], blob.media_type))

    stats = client.upload(d, size, lambda off: source.open_at(d, off), location=location, on_bytes=on_bytes)
    progress(PushEvent(d, size, "uploaded", sent[0], blob.media_type))
    return BlobReport(d, size, "uploaded", stats.sent, stats.resumed, stats.restarted)


def push(
    plan: PushPlan,
    source: BlobSource,
    target: Reference,
    options: TransportOptions | None = None,
    *,
    client: RegistryClient | None = None,
    mount_from: Sequence[str] = (),
    progress: Callable[[PushEvent], None] | None = None,
    cancel: threading.Event | None = None,
) -> PushResult:
    """Push ``plan`` to ``target`` (see the module docstring). Raises the registry's named
    error; on any failure no manifest has been put."""
    options = options or TransportOptions()
    cancel = cancel or threading.Event()
    own = client is None
    if client is None:
        client = RegistryClient(target, options, mount_from=mount_from, cancel=cancel)
    emit = progress or (lambda ev: None)
    lock = threading.Lock()

    def safe_emit(ev: PushEvent) -> None:
        with lock:
            emit(ev)

    try:
        client.ping()
        reports: dict[str, BlobReport] = {}
        pool = ThreadPoolExecutor(max_workers=max(1, options.jobs), thread_name_prefix="blobchain-push")
        futures: dict[Future[BlobReport], str] = {}
        try:
            for b in plan.blobs:
                fut = pool.submit(_push_blob, client, source, b, mount_from, safe_emit)
                futures[fut] = b.digest
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for fut in done:
                if fut.exception() is not None:
                    raise fut.exception()  # type: ignore[misc]
            for fut, digest in futures.items():
                reports[digest] = fut.result()
        except BaseException:
            cancel.set()  # stop the other uploads at their next read
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        # Every blob, verified present with its size, before any manifest goes up.
        for b in plan.blobs:
            got = client.blob_size(b.digest)
            if got != b.size:
                raise BlobUnknown(
                    f"blob {b.digest} is not in {target.registry}/{target.repository} after the upload "
                    f"(size {got}, expected {b.size}); no manifest was pushed"
                )
            safe_emit(PushEvent(b.digest, b.size, "verified", reports[b.digest].sent, b.media_type))
        pushed_manifests: list[str] = []
        for i, (desc, data) in enumerate(plan.manifests):
            last = i == len(plan.manifests) - 1
            ref = target.reference if last else desc.digest
            try:
                client.put_manifest(ref, desc.media_type, data, desc.digest)
            except ManifestBlobUnknown as e:
                raise ManifestBlobUnknown(
                    f"{e.message}; the registry lost a blob it had acknowledged"
                ) from None
            pushed_manifests.append(desc.digest)
            safe_emit(PushEvent(desc.digest, desc.size, "manifest", desc.size, desc.media_type))
        source.pushed(target.registry, target.repository, [b.digest for b in plan.blobs])
        return PushResult(
            str(target),
            plan.top.digest,
            plan.top.media_type,
            tuple(reports[b.digest] for b in plan.blobs),
            tuple(pushed_manifests),
        )
    finally:
        if own:
            client.close()
