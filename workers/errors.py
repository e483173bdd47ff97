"""The errors a unit of work raises about the work itself (the engine's and the stores' errors
live with them, in ``layers.errors`` and under ``storage/``)."""

from __future__ import annotations

from blobchain.layers.errors import FailedPrecondition, NotFound, Unavailable, register

__all__ = ["CorruptBlob", "InProgress", "NoBlobs"]


@register
class InProgress(Unavailable):
    """Another worker holds the ref's claim; check again later."""

    code = "in_progress"


@register
class NoBlobs(NotFound):
    """The ref has no blob and ``create_if_needed`` was false."""

    code = "no_blobs"


@register
class CorruptBlob(FailedPrecondition):
    """A stored blob cannot be decoded as its recorded compression (its bytes may still hash to
    its name: it was stored that way)."""

    code = "corrupt_blob"
