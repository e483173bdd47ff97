"""What one ref's diff reads: its snapshot and the lower side, assembled from its ancestry.

A pure function of the chain's specs (base first, the ref last) and a snapshot opener: the
caller reads the chain once and opens snapshots however it is confined (``open_snapshot`` with
the configured roots). The lower is the parent's full state: a rootfs snapshot stands alone; a
stack of overlay upper dirs is merged down to the nearest rootfs ancestor (:class:`LowerView`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from blobchain.layers.errors import InvalidArgument
from blobchain.layers.layer import LayerSource
from blobchain.layers.overlay import ROOTFS, LowerView
from blobchain.layers.records import RefSpec
from blobchain.layers.snapshot import Snapshot

__all__ = ["is_windows", "layer_source"]


def is_windows(chain: Sequence[RefSpec]) -> bool:
    """Windows layer mode applies when the ref or any ancestor is a windows layer."""
    return any(s.layer_type == "windows" for s in chain)


def layer_source(chain: Sequence[RefSpec], open_snapshot: Callable[[str], Snapshot]) -> LayerSource:
    """The :class:`LayerSource` of ``chain[-1]`` (``chain``: base first, each the parent of the
    next). Opens the ref's snapshot and only the ancestors its lower needs."""
    if not chain:
        raise InvalidArgument("a layer source needs the ref's spec")
    spec, parents = chain[-1], chain[:-1]
    upper = open_snapshot(spec.snapshot)
    lower: Snapshot | LowerView | None = None
    if parents:
        stack: list[tuple[Snapshot, str]] = []
        for s in reversed(parents):
            stack.append((open_snapshot(s.snapshot), s.kind))
            if s.kind == ROOTFS:
                break
        stack.reverse()
        if len(stack) == 1 and stack[0][1] == ROOTFS and spec.kind == ROOTFS:
            lower = stack[0][0]
        else:
            lower = LowerView([snap for snap, _ in stack], [kind for _, kind in stack])
    return LayerSource(upper=upper, lower=lower, kind=spec.kind, windows=is_windows(chain))
