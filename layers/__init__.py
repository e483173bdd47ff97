"""The pure layer engine: snapshot -> changes -> tar entries -> tar bytes -> compress + digest,
plus chain identity. Knows nothing of Celery, Redis or S3.

    from blobchain.layers import LayerOptions, LayerSource, open_snapshot, write_layer
    src = LayerSource(upper=open_snapshot("rootfs-1"), lower=open_snapshot("rootfs-0"))
    stats = write_layer(src, LayerOptions(compression="zstd"), sink.write)
"""

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
