"""Build one ref's blob: fast path, lease, diff -> compress -> ingest -> commit, record.

This is BuildKit's per-ref ``computeBlobChain`` flight body, independent of any transport: the
embedded executor and the Celery task both call :func:`build_ref`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from blobchain.layers.errors import InProgress, NoBlobs, RefNotFound
from blobchain.layers.layer import LayerSource, LayerStats, check_windows, convert_blob, write_layer
from blobchain.layers.overlay import LowerView
from blobchain.layers.records import DIFF_ID_LABEL, LayerBlob, LayerOptions, RefRecord, RefSpec
from blobchain.layers.snapshot import open_snapshot
from blobchain.storage.locks import Lease
from blobchain.storage.locks.heartbeat import Heartbeat
from blobchain.workers.deps import Deps
from blobchain.workers.plan import ancestry

__all__ = ["BuildOutcome", "build_ref", "flight_key", "is_windows", "layer_source"]

Progress = Callable[[int, int], None]
OnWork = Callable[[str], None]


@dataclass(frozen=True)
class BuildOutcome:
    record: RefRecord
    # "built" (diffed now), "converted" (recompressed a variant), "cached" (blob already there)
    action: str


def flight_key(ref_id: str, opts: LayerOptions) -> str:
    """Single-flight key: one computation per (ref, compression variant)."""
    return f"{ref_id}#{opts.variant_key()}"


def _spec(deps: Deps, ref_id: str) -> RefSpec | None:
    rec = deps.metadata.get(ref_id)
    return rec.spec if rec else None


def _lookup(deps: Deps, ref_id: str) -> Callable[[str], RefSpec | None]:
    """Spec lookup over ``ref_id``'s ancestry: one read of the whole chain where the store can
    (Redis: a server-side walk, so a ref's round trips do not grow with the chain's depth)."""
    many = getattr(deps.metadata, "chain_specs", None)
    if many is None:
        return lambda r: _spec(deps, r)
    specs: dict[str, RefSpec] = many(ref_id)
    return lambda r: specs[r] if r in specs else _spec(deps, r)


def is_windows(deps: Deps, ref_id: str) -> bool:
    """Windows layer mode applies when the ref or any ancestor is a windows layer."""
    lookup = _lookup(deps, ref_id)
    return any(lookup(r).layer_type == "windows" for r in ancestry(ref_id, lookup))  # type: ignore[union-attr]


def layer_source(deps: Deps, spec: RefSpec) -> LayerSource:
    """Open the ref's snapshot and its lower side, confined to the configured roots."""
    lookup = _lookup(deps, spec.ref_id)
    chain = [lookup(r) for r in ancestry(spec.ref_id, lookup)]
    windows = any(s.layer_type == "windows" for s in chain if s)
    upper = open_snapshot(spec.snapshot, deps.roots)
    parents = [s for s in chain[:-1] if s]
    lower: object = None
    if parents:
        # The lower is the parent's full state: a rootfs snapshot stands alone; a stack of
        # upper dirs is merged down to the nearest rootfs ancestor.
        stack: list[tuple[object, str]] = []
        for s in reversed(parents):
            stack.append((open_snapshot(s.snapshot, deps.roots), s.kind))
            if s.kind == "rootfs":
                break
        stack.reverse()
        if len(stack) == 1 and stack[0][1] == "rootfs" and spec.kind == "rootfs":
            lower = stack[0][0]
        else:
            lower = LowerView([snap for snap, _ in stack], [kind for _, kind in stack])
    return LayerSource(upper=upper, lower=lower, kind=spec.kind, windows=windows)  # type: ignore[arg-type]


def _have(deps: Deps, blob: LayerBlob | None) -> bool:
    return blob is not None and deps.content.info(blob.digest) is not None


def build_ref(
    ref_id: str,
    opts: LayerOptions,
    deps: Deps,
    *,
    create_if_needed: bool = True,
    progress: Progress | None = None,
    on_work: OnWork | None = None,
) -> BuildOutcome:
    """Make sure ``ref_id`` has a blob (and, with ``opts.force``, one in ``opts``' compression).

    Refs with a blob are not recomputed. Raises NoBlobs when there is none and
    ``create_if_needed`` is false, InProgress when another worker holds the ref's lease.
    ``on_work("built" | "converted")`` is called under the lease just before the diff (or the
    conversion) starts, so work that runs and then fails to commit is seen too.
    """
    rec = deps.metadata.get(ref_id)
    if rec is None:
        raise RefNotFound(f"unknown ref {ref_id}", ref=ref_id)
    if (done := _done(deps, rec, opts)) is not None:
        return BuildOutcome(done, "cached")
    if rec.blob is None and not create_if_needed:
        raise NoBlobs(f"no blobs for ref {ref_id}", ref=ref_id)
    if is_windows(deps, ref_id):
        check_windows(opts)

    lease = deps.locks.try_acquire(flight_key(ref_id, opts), deps.lease_ttl_s)
    if lease is None:
        raise InProgress(f"ref {ref_id} is being built by another worker", ref=ref_id)
    try:
        # The previous holder may have committed between our first look and the acquire.
        rec = deps.metadata.get(ref_id) or rec
        if (done := _done(deps, rec, opts)) is not None:
            return BuildOutcome(done, "cached")
        gc_lease = f"build-{uuid.uuid4().hex}"
        deps.leases.create_lease(gc_lease, deps.lease_ttl_s * 10)
        try:
            with Heartbeat(lease, deps.lease_ttl_s / 3, ttl_s=deps.lease_ttl_s) as hb:

                def tick(files: int, nbytes: int) -> None:
                    hb.check()
                    if progress:
                        progress(files, nbytes)

                action = "converted" if rec.blob is not None and _have(deps, rec.blob) else "built"
                if on_work is not None:
                    on_work(action)
                if action == "converted":
                    assert rec.blob is not None
                    blob = _convert(deps, rec.blob, opts, ref_id, gc_lease, tick)
                else:
                    blob = _build(deps, rec.spec, opts, ref_id, gc_lease, tick)
                hb.check()
                rec = _commit(deps, ref_id, blob, lease)
        finally:
            deps.leases.delete_lease(gc_lease)
        return BuildOutcome(rec, action)
    finally:
        lease.release()


def _commit(deps: Deps, ref_id: str, blob: LayerBlob, lease: Lease) -> RefRecord:
    """Record the blob. Stores that support fencing write only while our lease token still
    holds (a holder that lost its lease cannot commit over the new one); the others rely on
    the record rules alone (idempotent, same bytes from any worker)."""
    lease.refresh()
    return deps.metadata.set_blob(ref_id, blob, token=lease.token, lease_key=lease.key)


def _done(deps: Deps, rec: RefRecord, opts: LayerOptions) -> RefRecord | None:
    """The record if nothing needs doing: a blob exists (and the forced variant, if asked)."""
    if not _have(deps, rec.blob):
        return None
    if opts.force and not _have(deps, rec.blob_for(opts)):
        return None
    return rec


def _record(stats: LayerStats, digest: str, size: int, opts: LayerOptions) -> LayerBlob:
    return LayerBlob(
        digest=digest,
        size=size,
        media_type=opts.media_type,
        diff_id=stats.diff_id,
        compression=opts.compression,
        compressor=stats.compressor,
        variant=opts.variant_key(),
    )


def _build(
    deps: Deps, spec: RefSpec, opts: LayerOptions, ref_id: str, gc_lease: str, tick: Progress
) -> LayerBlob:
    src = layer_source(deps, spec)
    with deps.content.ingest(f"{ref_id}-{int(time.time())}") as ing:
        stats = write_layer(src, opts, ing.write, threads=deps.threads, progress=tick)
        info = ing.commit(labels={DIFF_ID_LABEL: stats.diff_id})
    deps.leases.add_resource(gc_lease, info.digest)
    return _record(stats, info.digest, info.size, opts)


def _convert(
    deps: Deps, source: LayerBlob, opts: LayerOptions, ref_id: str, gc_lease: str, tick: Progress
) -> LayerBlob:
    deps.leases.add_resource(gc_lease, source.digest)
    with deps.content.open(source.digest) as reader, deps.content.ingest(f"{ref_id}-convert") as ing:
        stats = convert_blob(
            reader, source.compression, source.diff_id, opts, ing.write, threads=deps.threads, progress=tick
        )
        info = ing.commit(labels={DIFF_ID_LABEL: stats.diff_id})
    deps.leases.add_resource(gc_lease, info.digest)
    return _record(stats, info.digest, info.size, opts)
