"""blobchain's front door for users: the Python client.

from blobchain.client import Client
with Client() as client:
    specs = client.register_chain(["rootfs-0", "rootfs-1"])
    with client.lease() as lease:
        result = client.compute_blob_chain(specs[-1].ref_id, compression="zstd", lease=lease).wait()
    client.export(result, "out-oci", tag="latest")
"""

from typing import TYPE_CHECKING

from blobchain.layers.errors import (
    BlobchainError,
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from blobchain.layers.imageconfig import ImageOptions, Platform
from blobchain.layers.lazy import lazy_exports
from blobchain.layers.records import Descriptor, LayerBlob, LayerOptions, RefRecord, RefSpec

if TYPE_CHECKING:
    from blobchain.client.api import Client, Lease, chain_specs
    from blobchain.workers.executor import ChainResult, Job, RefEvent

# The client and executor types load on first use (PEP 562), so the CLI's `push` does not
# import pydantic, Celery and the engine it never uses.
_LAZY = {
    "Client": "blobchain.client.api",
    "Lease": "blobchain.client.api",
    "chain_specs": "blobchain.client.api",
    "ChainResult": "blobchain.workers.executor",
    "Job": "blobchain.workers.executor",
    "RefEvent": "blobchain.workers.executor",
}


__getattr__ = lazy_exports(__name__, _LAZY)

__all__ = [
    # the client
    "Client",
    "Lease",
    "chain_specs",
    # records
    "ChainResult",
    "Descriptor",
    "ImageOptions",
    "Job",
    "LayerBlob",
    "LayerOptions",
    "Platform",
    "RefEvent",
    "RefRecord",
    "RefSpec",
    # errors
    "BlobchainError",
    "Conflict",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "Unavailable",
]
