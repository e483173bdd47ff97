"""Build one ref's blob: fast path, claim, diff -> compress -> ingest -> commit, record.

This is BuildKit's per-ref ``computeBlobChain`` flight body, independent of any transport: the
embedded executor and the Celery task both call :func:`build_ref`.

Integrity: the fast path trusts a recorded blob only if the store still has it intact
(``verify(quick=True)``: re-read in full when its size differs from the record, the store's
evidence says it changed, or it was marked damaged). A corrupt blob is quarantined by the store,
the ref's record is marked, and the blob is rebuilt here (from the snapshot, or converted from
an intact sibling). The new blob's digest is put on the build's GC lease before the ingest
commits it, so GC never sees it unreferenced.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blobchain.layers.errors import BlobchainError, Conflict, DigestMismatch, NotFound, RefNotFound
from blobchain.layers.records import DIFF_ID_LABEL, LayerBlob, LayerOptions, RefRecord, RefSpec
from blobchain.storage.claims import Claim
from blobchain.storage.claims.heartbeat import Heartbeat
from blobchain.storage.deps import Deps
from blobchain.workers.errors import CorruptBlob, InProgress, NoBlobs
from blobchain.workers.plan import ancestry

if TYPE_CHECKING:
    from blobchain.layers.layer import LayerStats

__all__ = ["BuildOutcome", "build_ref", "flight_key", "intact", "read_chain"]

log = logging.getLogger(__name__)

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


def read_chain(deps: Deps, ref_id: str) -> list[RefSpec]:
    """The specs of ``ref_id`` and its ancestors, base first, in one read of the store (Redis:
    a server-side walk), so a build's round trips do not grow with the chain's depth. Raises
    RefNotFound, MissingParent or ParentCycle as :func:`ancestry` does."""
    specs = deps.metadata.chain_specs(ref_id)
    return [specs[r] for r in ancestry(ref_id, specs.get)]


def intact(deps: Deps, rec: RefRecord, blob: LayerBlob | None) -> bool:
    """True if ``blob`` (one of ``rec``'s) is in the store and intact. A corrupt copy is
    quarantined (by the store's verifying read) and the record marked, so it gets rebuilt; a
    marked blob found intact on a full re-read is unmarked."""
    if blob is None:
        return False
    marked = blob.digest in rec.damaged
    try:
        info = deps.content.verify(blob.digest, quick=not marked)
        if info is not None and info.size != blob.size and not marked:
            info = deps.content.verify(blob.digest)  # another size than recorded: read it all
    except DigestMismatch as e:
        log.warning("ref %s: %s; it will be rebuilt", rec.ref_id, e.message)
        if not marked:
            deps.metadata.mark_damaged(rec.ref_id, blob.digest)
        return False
    if info is None:
        return False
    if marked:
        deps.metadata.clear_damaged(rec.ref_id, blob.digest)
    return True


def build_ref(
    ref_id: str,
    opts: LayerOptions,
    deps: Deps,
    *,
    create_if_needed: bool = True,
    force: bool = False,
    progress: Progress | None = None,
    on_work: OnWork | None = None,
) -> BuildOutcome:
    """Make sure ``ref_id`` has a blob (and, with ``force``, one in ``opts``' compression, as
    BuildKit's forced compression).

    Refs with a blob are not recomputed. Raises NoBlobs when there is none and
    ``create_if_needed`` is false, InProgress when another worker holds the ref's claim.
    ``on_work("built" | "converted")`` is called under the claim just before the diff (or the
    conversion) starts, so work that runs and then fails to commit is seen too.
    """
    rec = deps.metadata.get(ref_id)
    if rec is None:
        raise RefNotFound(f"unknown ref {ref_id}", ref=ref_id)
    if (done := _done(deps, rec, opts, force)) is not None:
        return BuildOutcome(done, "cached")
    if rec.blob is None and not create_if_needed:
        raise NoBlobs(f"no blobs for ref {ref_id}", ref=ref_id)
    # The engine loads only for work: a ref found built (the CLI rerun) never imports it.
    from blobchain.layers.layer import check_windows
    from blobchain.layers.lower import is_windows

    chain = read_chain(deps, ref_id)
    if is_windows(chain):  # decided once, from the chain read once
        check_windows(opts)

    key = flight_key(ref_id, opts)
    claim = deps.claims.try_acquire(key, deps.lease_ttl_s)
    if claim is None:
        raise InProgress(f"ref {ref_id} is being built by another worker", ref=ref_id)
    try:
        # The previous holder may have committed between our first look and the acquire.
        rec = deps.metadata.get(ref_id) or rec
        if (done := _done(deps, rec, opts, force)) is not None:
            return BuildOutcome(done, "cached")
        gc_lease = f"build-{uuid.uuid4().hex}"
        deps.leases.create_lease(gc_lease, deps.lease_ttl_s * 10)
        try:
            with Heartbeat(claim, deps.lease_ttl_s / 3, ttl_s=deps.lease_ttl_s) as hb:

                def tick(files: int, nbytes: int) -> None:
                    hb.check()
                    if progress:
                        progress(files, nbytes)

                try:
                    blob, action = _make(deps, rec, chain, opts, key, gc_lease, tick, on_work)
                except NotFound:
                    # Our upload was swept by a new holder of the claim we lost: say so.
                    hb.check()
                    claim.refresh()
                    raise
                hb.check()
                recorded = (deps.metadata.get(ref_id) or rec).blob_for(opts)
                if recorded is not None and recorded.digest != blob.digest:
                    raise Conflict(
                        f"ref {ref_id}: the rebuilt {opts.variant_key()} blob is {blob.digest}, but the"
                        f" record names {recorded.digest} (did the compressor change?); the record"
                        " is kept",
                        ref=ref_id,
                        recorded=recorded.digest,
                        rebuilt=blob.digest,
                    )
                rec = _commit(deps, ref_id, blob, claim)
        finally:
            deps.leases.delete_lease(gc_lease)
        return BuildOutcome(rec, action)
    finally:
        claim.release()


def _commit(deps: Deps, ref_id: str, blob: LayerBlob, claim: Claim) -> RefRecord:
    """Record the blob. Stores that support fencing write only while our claim token still
    holds (a holder that lost its claim cannot commit over the new one); the others rely on
    the record rules alone (idempotent, same bytes from any worker)."""
    claim.refresh()
    return deps.metadata.set_blob(ref_id, blob, token=claim.token, claim_key=claim.key)


def _done(deps: Deps, rec: RefRecord, opts: LayerOptions, force: bool) -> RefRecord | None:
    """The record if nothing needs doing: an intact blob (and the forced variant, if asked)."""
    if rec.blob is not None and rec.blob.from_base:
        return rec  # a base image's layer: its blob exists already, fetched only when needed
    if not intact(deps, rec, rec.blob):
        return None
    if force and not intact(deps, rec, rec.blob_for(opts)):
        return None
    if rec.damaged:  # marks were cleared (or others remain): report the record as it is now
        rec = deps.metadata.get(rec.ref_id) or rec
    return rec


def _sweep_dead_holder(deps: Deps, key: str) -> None:
    """We hold the ref's claim, so any ingest under its name is a dead (or ousted) holder's."""
    try:
        n = deps.content.sweep(0, ref=key)
    except BlobchainError as e:  # the age-based sweep (gc) gets them later
        log.warning("could not sweep the previous holder's ingests of %s: %s", key, e)
        return
    if n:
        log.info("swept %d ingests a previous holder of %s left behind", n, key)


def _make(
    deps: Deps,
    rec: RefRecord,
    chain: list[RefSpec],
    opts: LayerOptions,
    key: str,
    gc_lease: str,
    tick: Progress,
    on_work: OnWork | None,
) -> tuple[LayerBlob, str]:
    """Convert an intact existing blob (no walk), else diff the snapshot. ``on_work(action)``
    before each piece of work starts (and before anything else that could delay it)."""
    source = rec.blob
    if source is not None and intact(deps, rec, source):
        if on_work is not None:
            on_work("converted")
        _sweep_dead_holder(deps, key)
        try:
            return _convert(deps, rec.ref_id, source, opts, key, gc_lease, tick), "converted"
        except DigestMismatch as e:
            if e.expected != source.digest:
                raise
            # The source turned out corrupt while converting (it is quarantined and marked
            # now): build from the snapshot instead.
    if on_work is not None:
        on_work("built")
    _sweep_dead_holder(deps, key)
    return _build(deps, chain, opts, key, gc_lease, tick), "built"


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
    deps: Deps, chain: list[RefSpec], opts: LayerOptions, key: str, gc_lease: str, tick: Progress
) -> LayerBlob:
    from blobchain.layers.layer import write_layer
    from blobchain.layers.lower import layer_source
    from blobchain.layers.snapshot import open_snapshot

    src = layer_source(chain, lambda path: open_snapshot(path, deps.roots))
    # The ingest is named by the flight key: only the claim holder writes under that name.
    with deps.content.ingest(key) as ing:
        stats = write_layer(src, opts, ing.write, threads=deps.threads, progress=tick)
        # Leased before it is published (containerd ties an ingest to its lease): GC running
        # between the commit and the record cannot take it.
        deps.leases.add_resource(gc_lease, ing.digest)
        info = ing.commit(labels={DIFF_ID_LABEL: stats.diff_id})
    return _record(stats, info.digest, info.size, opts)


def _convert(
    deps: Deps,
    ref_id: str,
    source: LayerBlob,
    opts: LayerOptions,
    key: str,
    gc_lease: str,
    tick: Progress,
) -> LayerBlob:
    from blobchain.layers.layer import convert_blob

    deps.leases.add_resource(gc_lease, source.digest)
    try:
        with deps.content.open(source.digest) as reader, deps.content.ingest(key) as ing:
            stats = convert_blob(
                reader, source.compression, source.diff_id, opts, ing.write, threads=deps.threads, progress=tick
            )
            deps.leases.add_resource(gc_lease, ing.digest)
            info = ing.commit(labels={DIFF_ID_LABEL: stats.diff_id})
    except DigestMismatch as e:
        if e.expected == source.digest:  # the verifying read: quarantined; mark the record
            deps.metadata.mark_damaged(ref_id, source.digest)
        raise
    except BlobchainError:
        raise
    except Exception as e:
        # A decompressor error (zlib_ng.error, zstd.ZstdError, EOFError...): such classes may
        # not even pickle across a process pool. Is the stored copy damaged? Read it all
        # through the verifier: a mismatch quarantines it (DigestMismatch, handled above by the
        # caller's fallback); otherwise it was stored undecodable, a named error.
        try:
            deps.content.verify(source.digest)
        except DigestMismatch:
            deps.metadata.mark_damaged(ref_id, source.digest)
            raise
        raise CorruptBlob(
            f"blob {source.digest} of ref {ref_id} does not decode as {source.compression}:"
            f" {type(e).__name__}: {e}",
            ref=ref_id,
            digest=source.digest,
            compression=str(source.compression),
        ) from None
    return _record(stats, info.digest, info.size, opts)
