"""Chain IDs, exactly as OCI image-spec ``identity.ChainID`` and BuildKit ``computeChainMetadata``."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from blobchain.layers.errors import NonAddressableParent
from blobchain.layers.records import check_digest

__all__ = ["blob_id", "chain_id", "chain_ids", "next_ids"]


def chain_id(digests: Sequence[str]) -> str:
    """``identity.ChainID``: "" for none, the digest itself for one, else a left fold of
    ``sha256(acc + " " + next)``."""
    if not digests:
        return ""
    acc = check_digest(digests[0])
    for d in digests[1:]:
        acc = "sha256:" + hashlib.sha256(f"{acc} {check_digest(d)}".encode("ascii")).hexdigest()
    return acc


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """``identity.ChainIDs``: the chain ID of every prefix."""
    out: list[str] = []
    for d in diff_ids:
        out.append(chain_id([out[-1], d]) if out else check_digest(d))
    return out


def blob_id(blob_digest: str, diff_id: str) -> str:
    return chain_id([blob_digest, diff_id])


def next_ids(
    parent: tuple[str | None, str | None] | None, blob_digest: str, diff_id: str, *, ref: str = ""
) -> tuple[str, str]:
    """(chainID, blobChainID) of a layer given its parent's pair (None for a base layer).

    Base: chainID = diffID, blobChainID = ChainID([blob, diffID]).
    Else: chainID = ChainID([parentChainID, diffID]),
          blobChainID = ChainID([parentBlobChainID, ChainID([blob, diffID])]).
    """
    bid = blob_id(blob_digest, diff_id)
    if parent is None:
        return check_digest(diff_id), bid
    p_chain, p_blob_chain = parent
    if not p_chain or not p_blob_chain:
        raise NonAddressableParent("non-addressable parent", ref=ref)
    return chain_id([p_chain, diff_id]), chain_id([p_blob_chain, bid])
