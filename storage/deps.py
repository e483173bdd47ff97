"""What a unit of work needs: the stores and the snapshot roots it may read."""

from __future__ import annotations

from dataclasses import dataclass, replace

from blobchain.layers.compress import available_cpus, threads_for_share
from blobchain.layers.records import LayerOptions
from blobchain.storage.claims import ClaimService
from blobchain.storage.content import ContentStore
from blobchain.storage.leases import LeaseManager
from blobchain.storage.metadata import MetadataStore

__all__ = ["Deps"]


@dataclass(frozen=True)
class Deps:
    content: ContentStore
    metadata: MetadataStore
    leases: LeaseManager
    claims: ClaimService
    # Snapshot paths must resolve inside one of these; None = any path (embedded CLI default).
    roots: tuple[str, ...] | None = None
    # Threads for intra-layer compression; None = all cores.
    threads: int | None = None
    lease_ttl_s: float = 60.0

    def sharing_cores(self, opts: LayerOptions, at_once: int) -> Deps:
        """These deps for one of ``at_once`` builds running together on this machine: unless
        ``threads`` was configured, each build gets its share of the cores where that pays
        (:func:`threads_for_share`)."""
        if self.threads is not None or at_once <= 1:
            return self
        threads = threads_for_share(opts.compression, available_cpus() // at_once)
        return self if threads is None else replace(self, threads=threads)
