"""The pure layer engine: snapshot -> changes -> tar entries -> tar bytes -> compress + digest,
plus chain identity. Knows nothing of Celery, Redis or S3.

    from blobchain.layers import LayerOptions, LayerSource, open_snapshot, write_layer
    src = LayerSource(upper=open_snapshot("rootfs-1"), lower=open_snapshot("rootfs-0"))
    stats = write_layer(src, LayerOptions(compression="zstd"), sink.write)
"""

from typing import TYPE_CHECKING

from blobchain.layers.lazy import lazy_exports

if TYPE_CHECKING:
    from blobchain.layers.errors import BlobchainError
    from blobchain.layers.identity import blob_id, chain_id, chain_ids, next_ids
    from blobchain.layers.layer import LayerSource, LayerStats, convert_blob, write_layer
    from blobchain.layers.records import (
        DIFF_ID_LABEL,
        EMPTY_LAYER_DIFF_ID,
        Compression,
        Descriptor,
        LayerBlob,
        LayerOptions,
        RefRecord,
        RefSpec,
    )
    from blobchain.layers.snapshot import Snapshot, open_snapshot

# Loaded on first use (PEP 562): ``import blobchain.layers.errors`` (every module does) must not
# import the whole engine, its compressors and the C extension (start-up of the CLI).
_LAZY = {
    "BlobchainError": ".errors",
    "blob_id": ".identity",
    "chain_id": ".identity",
    "chain_ids": ".identity",
    "next_ids": ".identity",
    "LayerSource": ".layer",
    "LayerStats": ".layer",
    "convert_blob": ".layer",
    "write_layer": ".layer",
    "DIFF_ID_LABEL": ".records",
    "EMPTY_LAYER_DIFF_ID": ".records",
    "Compression": ".records",
    "Descriptor": ".records",
    "LayerBlob": ".records",
    "LayerOptions": ".records",
    "RefRecord": ".records",
    "RefSpec": ".records",
    "Snapshot": ".snapshot",
    "open_snapshot": ".snapshot",
}


__getattr__ = lazy_exports(__name__, _LAZY)


__all__ = [
    # the data path
    "LayerSource",
    "LayerStats",
    "Snapshot",
    "convert_blob",
    "open_snapshot",
    "write_layer",
    # identity
    "blob_id",
    "chain_id",
    "chain_ids",
    "next_ids",
    # records
    "DIFF_ID_LABEL",
    "EMPTY_LAYER_DIFF_ID",
    "Compression",
    "Descriptor",
    "LayerBlob",
    "LayerOptions",
    "RefRecord",
    "RefSpec",
    # errors (the full hierarchy is in blobchain.layers.errors)
    "BlobchainError",
]
