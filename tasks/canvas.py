"""The shape of a chain's work on the queue: one flat chord. Pure (builds signatures, sends nothing).

Header: one ``build_ref`` per ref of the chain, all runnable at once (a parent's diff never
waits for its child's: each diff needs only the two snapshots). Body: ``finalize_chain``, which
sets the chain IDs parents first once every ref has its blob. No task waits on another task's
result, and the header stays flat (nested groups lose their order on Redis, see the docs §1.4).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celery import Celery, chord
from celery.canvas import Signature

from blobchain.layers.records import LayerOptions
from blobchain.tasks.app import QUEUE
from blobchain.tasks.layer_tasks import BUILD_TASK, FINALIZE_TASK

__all__ = ["chain_signature"]


def chain_signature(
    app: Celery,
    ref_ids: Sequence[str],
    opts: LayerOptions,
    create_if_needed: bool,
    ref_id: str,
    *,
    force: bool = False,
    header_ids: Sequence[str] | None = None,
    body_id: str | None = None,
) -> Signature:
    """The chord computing ``ref_id``'s chain. ``ref_ids`` is the chain, base first (each once);
    ``header_ids``/``body_id`` fix the task ids (the client uses them to follow each ref)."""
    if not ref_ids or ref_ids[-1] != ref_id:
        raise ValueError(f"the chain must end with {ref_id!r}")
    if len(set(ref_ids)) != len(ref_ids):
        raise ValueError("a chain lists each ref once")
    if header_ids is not None and len(header_ids) != len(ref_ids):
        raise ValueError("header_ids must match ref_ids one to one")
    o = opts.to_dict()
    header = []
    for i, r in enumerate(ref_ids):
        options: dict[str, Any] = {"queue": QUEUE}
        if header_ids is not None:
            options["task_id"] = header_ids[i]
        header.append(
            app.signature(BUILD_TASK, args=(r, o, create_if_needed, force), options=options, immutable=True)
        )
    body_opts: dict[str, Any] = {"queue": QUEUE}
    if body_id is not None:
        body_opts["task_id"] = body_id
    body = app.signature(FINALIZE_TASK, args=(ref_id, o), options=body_opts)
    return chord(header, body, app=app)
