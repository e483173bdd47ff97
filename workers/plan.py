"""Validate a submission of refs and put it in order (parents first). Pure."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from blobchain.layers.errors import ConflictingParent, MissingParent, ParentCycle, RefNotFound
from blobchain.layers.records import RefRecord, RefSpec

__all__ = ["Plan", "ancestry", "make_plan"]


@dataclass(frozen=True)
class Plan:
    """``order`` lists every ref of the submission and its known ancestors, parents first."""

    order: tuple[str, ...]
    specs: dict[str, RefSpec]

    def chain(self, ref_id: str) -> list[str]:
        """``ref_id`` and its ancestors, base first."""
        return ancestry(ref_id, self.specs.get)


def ancestry(ref_id: str, lookup: Callable[[str], RefSpec | None]) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    cur: str | None = ref_id
    while cur is not None:
        if cur in seen:
            raise ParentCycle(f"parent cycle through ref {cur}", ref=cur)
        seen.add(cur)
        spec = lookup(cur)
        if spec is None and not out:
            raise RefNotFound(f"unknown ref {cur}", ref=cur)
        if spec is None:
            raise MissingParent(f"ref {out[-1] if out else ref_id} has unknown parent {cur}", ref=cur)
        out.append(cur)
        cur = spec.parent
    out.reverse()
    return out


def make_plan(specs: Iterable[RefSpec], known: Callable[[str], RefRecord | None]) -> Plan:
    """Dedupe ``specs``, check them against each other and against ``known`` records, and order
    them. Raises ConflictingParent (one ref, two different specs), MissingParent, ParentCycle."""
    by_id: dict[str, RefSpec] = {}
    for spec in specs:
        prev = by_id.get(spec.ref_id)
        if prev is not None and prev != spec:
            raise ConflictingParent(
                f"ref {spec.ref_id} given twice with different parent or snapshot "
                f"({prev.parent!r} vs {spec.parent!r})",
                ref=spec.ref_id,
            )
        by_id[spec.ref_id] = spec
    for spec in list(by_id.values()):
        rec = known(spec.ref_id)
        if rec is not None and rec.spec != spec:
            raise ConflictingParent(
                f"ref {spec.ref_id} is already registered with parent {rec.spec.parent!r} "
                f"and snapshot {rec.spec.snapshot!r}",
                ref=spec.ref_id,
            )

    def lookup(ref_id: str) -> RefSpec | None:
        if ref_id in by_id:
            return by_id[ref_id]
        rec = known(ref_id)
        if rec is not None:
            by_id[ref_id] = rec.spec
            return rec.spec
        return None

    order: list[str] = []
    placed: set[str] = set()
    for ref_id in list(by_id):
        for r in ancestry(ref_id, lookup):
            if r not in placed:
                placed.add(r)
                order.append(r)
    return Plan(order=tuple(order), specs=dict(by_id))
