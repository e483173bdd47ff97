"""blobchain's front door for users: the Python client.

from blobchain.client import Client
with Client() as client:
    specs = client.register_chain(["rootfs-0", "rootfs-1"])
    with client.lease() as lease:
        result = client.compute_blob_chain(specs[-1].ref_id, compression="zstd", lease=lease).wait()
    client.export(result, "out-oci", tag="latest")
"""

from blobchain.client.api import Client, Lease, chain_specs
from blobchain.layers.errors import (
    BlobchainError,
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from blobchain.layers.imageconfig import ImageOptions, Platform
from blobchain.layers.records import Descriptor, LayerBlob, LayerOptions, RefRecord, RefSpec
from blobchain.workers.executor import ChainResult, Job, RefEvent

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
