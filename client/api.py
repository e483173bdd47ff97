"""The Python client: register refs, compute blob chains, read status, export."""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blobchain.config.defaults import Defaults, check_jobs
from blobchain.config.factory import DepsOpener, open_deps
from blobchain.layers.errors import FailedPrecondition, RefNotFound, SnapshotOutsideRoots
from blobchain.layers.imageconfig import ImageOptions
from blobchain.layers.records import Compression, Descriptor, LayerOptions, RefRecord, RefSpec
from blobchain.storage.deps import Deps
from blobchain.storage.leases import MissingLease
from blobchain.workers.executor import ChainResult, Executor, Job
from blobchain.workers.plan import make_plan

if TYPE_CHECKING:  # the registry client (httpx) loads only for a push: start-up of export
    from blobchain.client.base import BaseImage
    from blobchain.config.defaults import AnySettings
    from blobchain.layers.imageconfig import Platform
    from blobchain.registry.client import TransportOptions
    from blobchain.registry.push import PushEvent, PushResult
    from blobchain.storage.gc import GCReport
    from blobchain.tasks.inspect import RefStatus

__all__ = ["Client", "Lease", "chain_specs"]


@dataclass(frozen=True)
class Lease:
    """Holds the blobs of what is computed under it against GC until it is closed."""

    lease_id: str


def _ref_id(kind: str, layer_type: str, path: str, parent: str | None) -> str:
    h = hashlib.sha256(f"{kind}\0{layer_type}\0{path}\0{parent or ''}".encode("utf-8", "surrogateescape"))
    return "r-" + h.hexdigest()[:24]


def chain_specs(
    snapshots: Sequence[str | os.PathLike[str]],
    *,
    kind: str = "rootfs",
    layer_type: str = "linux",
    ref_ids: Sequence[str] | None = None,
    parent: str | None = None,
) -> list[RefSpec]:
    """Specs for a chain of snapshot paths, base first: the parent of snapshot i is i-1.

    Without ``ref_ids``, ids are derived from (kind, layer type, absolute path, parent id), so the
    same chain gets the same ids on any run. Snapshots are treated as immutable: a changed
    directory needs a new path or explicit ids.
    """
    if ref_ids is not None and len(ref_ids) != len(snapshots):
        raise ValueError("ref_ids must match snapshots one to one")
    specs: list[RefSpec] = []
    for i, snap in enumerate(snapshots):
        path = os.path.normpath(os.path.abspath(os.fspath(snap)))
        rid = ref_ids[i] if ref_ids else _ref_id(kind, layer_type, path, parent)
        specs.append(RefSpec(ref_id=rid, snapshot=path, parent=parent, kind=kind, layer_type=layer_type))
        parent = rid
    return specs


class Client:
    """``Client()`` runs embedded (in-process, local store) unless the settings name a broker;
    then work goes to Celery workers. ``executor=`` overrides the choice (e.g. for tests);
    ``deps=`` hands in stores already open (the executor's, to share one set). ``settings``:
    a :class:`~blobchain.config.settings.Settings` (default: ``load_settings()``), or the
    :class:`~blobchain.config.defaults.Defaults` that ``quick_settings()`` gives."""

    def __init__(
        self,
        settings: AnySettings | None = None,
        *,
        executor: Executor | None = None,
        deps: Deps | None = None,
        jobs: int | None = None,
        in_process: bool = False,
        create_store: bool = True,
    ) -> None:
        if settings is None:
            from blobchain.config.settings import load_settings

            settings = load_settings()
        self.settings: AnySettings = settings
        self._executor = executor
        self._jobs = check_jobs(jobs)
        self._in_process = in_process
        self._create_store = create_store
        self._deps = deps

    @property
    def deps(self) -> Deps:
        """The stores, opened on first use (``config.factory``, the one place that chooses
        them). With ``create_store=False`` a missing embedded store is StoreNotFound instead of
        a new empty one (for status and gc)."""
        if self._deps is None:
            self._deps = open_deps(self.settings, create=self._create_store)
        return self._deps

    @property
    def executor(self) -> Executor:
        """The executor the settings call for, given the client's stores, made on first use."""
        if self._executor is None:
            if not isinstance(self.settings, Defaults) and self.settings.distributed:
                from blobchain.tasks.submit import CeleryExecutor

                self._executor = CeleryExecutor(self.settings, self.deps)
            else:
                from blobchain.workers.embedded import EmbeddedExecutor

                self._executor = EmbeddedExecutor(
                    self.deps,
                    opener=DepsOpener(self.settings),
                    jobs=self._jobs or self.settings.jobs,
                    wait_budget_s=self.settings.wait_budget_s,
                    in_process=self._in_process,
                )
        return self._executor

    # --- refs -----------------------------------------------------------------------------

    def _check_snapshot(self, spec: RefSpec) -> None:
        roots = self.settings.roots or None
        if self.settings.distributed:
            # Workers see the snapshots; the client only checks the path is under a root.
            if roots and not any(
                os.path.commonpath([spec.snapshot, os.path.abspath(r)]) == os.path.abspath(r) for r in roots
            ):
                raise SnapshotOutsideRoots(
                    f"snapshot {spec.snapshot} is outside the configured roots",
                    ref=spec.ref_id,
                    path=spec.snapshot,
                )
        else:
            from blobchain.layers.snapshot import open_snapshot

            open_snapshot(spec.snapshot, roots)

    def register(self, specs: Sequence[RefSpec]) -> list[RefRecord]:
        """Validate the specs together (missing parent, cycle, conflicting parent, snapshot
        visible and inside the roots, not overlapping the embedded store) and only then record
        them, parents first."""
        if not self.settings.distributed:
            from blobchain.client.layout import check_disjoint

            # Before the store is opened (opening creates it).
            check_disjoint(self.settings.store, [s.snapshot for s in specs])
        plan = make_plan(specs, self.deps.metadata.get)
        given = {s.ref_id for s in specs}
        for ref_id in plan.order:
            # Known refs were checked when first registered; their blobs may not need the snapshot.
            if ref_id in given and self.deps.metadata.get(ref_id) is None:
                self._check_snapshot(plan.specs[ref_id])
        return [self.deps.metadata.register(plan.specs[r]) for r in plan.order if r in given]

    def register_chain(
        self,
        snapshots: Sequence[str | os.PathLike[str]],
        *,
        kind: str = "rootfs",
        layer_type: str = "linux",
        ref_ids: Sequence[str] | None = None,
        parent: str | None = None,
    ) -> list[RefSpec]:
        """:func:`chain_specs` of ``snapshots``, registered."""
        specs = chain_specs(snapshots, kind=kind, layer_type=layer_type, ref_ids=ref_ids, parent=parent)
        self.register(specs)
        return specs

    def chain_status(self, ref_id: str) -> list[RefStatus]:
        """Distributed mode: each ref of ``ref_id``'s chain with its state, the claim's holder
        (worker, pid), its time left, attempts and takeovers."""
        from blobchain.config.factory import open_distributed
        from blobchain.tasks.inspect import chain_status

        if isinstance(self.settings, Defaults):
            raise FailedPrecondition("chain status needs distributed mode (BLOBCHAIN_BROKER_URL)")
        claims = open_distributed(self.settings).claims
        return chain_status(self.deps.metadata, claims, ref_id, self.settings.key_prefix)

    def status(self, ref_id: str) -> RefRecord:
        rec = self.deps.metadata.get(ref_id)
        if rec is None:
            raise RefNotFound(f"unknown ref {ref_id}", ref=ref_id)
        return rec

    # --- computing ------------------------------------------------------------------------

    @contextlib.contextmanager
    def lease(self, ttl_s: float = 24 * 3600) -> Iterator[Lease]:
        lease = Lease(f"client-{uuid.uuid4().hex}")
        self.deps.leases.create_lease(lease.lease_id, ttl_s)
        try:
            yield lease
        finally:
            self.deps.leases.delete_lease(lease.lease_id)

    def compute_blob_chain(
        self,
        ref_id: str,
        *,
        compression: str = "gzip",
        level: int | None = None,
        force: bool = False,
        create_if_needed: bool = True,
        lease: Lease | None = None,
        source_date_epoch: int | None = None,
    ) -> Job:
        """Make sure ``ref_id`` and its ancestors have blobs, then set chain IDs, as BuildKit's
        ``computeBlobChain``. Needs a lease (``with client.lease() as lease``)."""
        if lease is None:
            raise MissingLease("missing lease requirement", ref=ref_id)
        if self.deps.metadata.get(ref_id) is None:
            raise RefNotFound(f"unknown ref {ref_id}: register it first", ref=ref_id)
        opts = LayerOptions(
            compression=Compression.parse(compression),
            level=level,
            source_date_epoch=source_date_epoch,
        )
        return self.executor.submit(ref_id, opts, create_if_needed=create_if_needed, force=force)

    def hold(self, lease: Lease, result: ChainResult) -> None:
        for blob in result.layer_blobs():
            self.deps.leases.add_resource(lease.lease_id, blob.digest)

    # --- export ---------------------------------------------------------------------------

    def export(
        self,
        result: ChainResult,
        dest: str | os.PathLike[str],
        *,
        tag: str | None = None,
        image: ImageOptions | None = None,
        base: BaseImage | None = None,
    ) -> Descriptor:
        """Write ``result`` as an image in the OCI layout at ``dest``; returns the manifest's
        descriptor. ``image`` sets the platform, what the image runs, its history comments,
        created time and manifest annotations (default: host platform, no command, unset
        created, so the same chain always gives the same manifest digest). ``base``: the
        chain was registered on :meth:`base` (its blobs are fetched here only if needed)."""
        from blobchain.client.export import export_layout

        return export_layout(result, self.deps, os.fspath(dest), tag=tag, image=image, base=base)

    def base(
        self,
        image: str,
        *,
        snapshot: str | os.PathLike[str] | None = None,
        cache: str | os.PathLike[str] | None = None,
        platform: Platform | None = None,
        options: TransportOptions | None = None,
    ) -> BaseImage:
        """Build on ``image`` (``oci:DIR[:TAG]`` or ``REGISTRY/REPO:TAG``), as Dockerfile's FROM:
        its layers become refs with blobs; pass ``parent=base.top_ref`` to
        :meth:`register_chain`, and ``base=`` to :meth:`export` / :meth:`push`. ``snapshot``:
        a directory holding the base's top state (else it is unpacked once into ``cache``,
        default ``<store>/.blobchain/base-rootfs``)."""
        from blobchain.client.base import default_cache, open_base

        return open_base(
            self.deps,
            image,
            cache=os.fspath(cache) if cache is not None else default_cache(self.settings.store),
            snapshot=os.fspath(snapshot) if snapshot is not None else None,
            platform=platform,
            options=options,
        )

    def push(
        self,
        result: ChainResult,
        target: str,
        *,
        image: ImageOptions | None = None,
        options: TransportOptions | None = None,
        mount_from: Sequence[str] = (),
        progress: Callable[[PushEvent], None] | None = None,
        base: BaseImage | None = None,
    ) -> PushResult:
        """Push ``result`` as an image to ``target`` (``registry/repo:tag``): the same config and
        manifest ``export`` writes, layers streamed from the content store (S3 in distributed
        mode: no local copy). Blobs the registry has are skipped; the manifest goes last."""
        from blobchain.client.push import push_chain

        return push_chain(
            result,
            self.deps.content,
            target,
            image=image,
            options=options,
            mount_from=mount_from,
            progress=progress,
            base=base,
        )

    def index(self, layout: str | os.PathLike[str], tag: str, tags: Sequence[str]) -> Descriptor:
        """Write an image index over the images tagged ``tags`` in ``layout`` (platforms from
        their configs) and tag it ``tag``; returns the index's descriptor."""
        from blobchain.client.export import write_image_index

        return write_image_index(os.fspath(layout), tag, list(tags), self.deps)

    def gc(self, *, dry_run: bool = False) -> GCReport:
        from blobchain.storage.gc import collect_garbage

        # The grace period covers blobs committed by a build that has not yet leased them.
        return collect_garbage(
            self.deps.content,
            self.deps.metadata,
            self.deps.leases,
            dry_run=dry_run,
            grace_s=self.settings.lease_ttl_s,
        )

    def close(self) -> None:
        if self._executor is not None:
            self._executor.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, et: object, e: object, tb: object) -> None:
        if self._executor is not None:
            self._executor.close(cancel=isinstance(e, KeyboardInterrupt))
