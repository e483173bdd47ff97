"""Push images to an OCI distribution registry (``blobchain push``).

Below ``client/``, beside ``storage/``: it knows registries, HTTP and auth, and nothing of
Celery, Redis or S3. Bytes come from a :class:`~blobchain.registry.push.BlobSource`.
"""

from blobchain.registry.auth import Credentials, find_credentials
from blobchain.registry.client import RegistryClient, TransportOptions
from blobchain.registry.errors import RegistryError
from blobchain.registry.push import (
    BlobReport,
    BlobSource,
    LayoutSource,
    PushEvent,
    PushPlan,
    PushResult,
    push,
)
from blobchain.registry.reference import Reference, parse_reference

__all__ = [
    "BlobReport",
    "BlobSource",
    "Credentials",
    "LayoutSource",
    "PushEvent",
    "PushPlan",
    "PushResult",
    "Reference",
    "RegistryClient",
    "RegistryError",
    "TransportOptions",
    "find_credentials",
    "parse_reference",
    "push",
]
