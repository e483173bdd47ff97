"""The Celery tasks: thin adapters over ``workers.refjob.build_ref`` and
``workers.chainjob.finalize_chain``.

Each task maps the engine's errors to what a queue should do with them:

- ``InProgress`` (another worker holds the ref's claim) and ``ClaimLost``: retry later with the
  executors' backoff (``workers.retry``: capped exponential with jitter; the worker slot is freed
  meanwhile), for at most ``settings.wait_budget_s`` in total, then fail with ``InProgress``.
- ``Unavailable`` (S3 or Redis down): a few retries with backoff, then fail with the error.
- any other ``BlobchainError`` (bad input, missing blob, ...): fail at once.
- a ref whose build keeps killing its worker fails with ``PoisonRef`` (:mod:`.poison`).
- the soft time limit: fail with ``RefTimedOut`` (the hard limit's ``TimeLimitExceeded`` is
  mapped to it by the client).

Takeover: the build's claim carries this task's message (``storage.claims.redis``: a tracked
claim). If the worker dies (or is cut off) its claim expires without a release, and a worker's
janitor (``tasks.janitor``) sends the same task (same id, same chord) again at once, with
``takeover={"reason", ...}``: the broker's own redelivery, after the visibility timeout, is not
waited for. The message it finally restores finds the task done and is skipped
(``worker_deduplicate_successful_tasks``); the chord counts each header task once.

Failures cross the result backend as :class:`~.errors.RefFailed`, so the client rebuilds the same
``BlobchainError`` subclass. Tasks never wait on other tasks; each process's stores come from
the worker's start-up (:mod:`.startup`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from typing import Any

from celery import shared_task
from celery.exceptions import Retry, SoftTimeLimitExceeded
from celery.utils.log import get_task_logger

from blobchain.layers.errors import BlobchainError, Unavailable
from blobchain.layers.records import LayerOptions
from blobchain.storage.claims import ClaimLost
from blobchain.storage.deps import Deps
from blobchain.storage.redis_util import redis_errors
from blobchain.tasks.errors import RefFailed, RefTimedOut
from blobchain.tasks.poison import Attempt, PoisonRef
from blobchain.tasks.startup import WorkerContext, pool_size, settings_of, worker_context
from blobchain.tasks.timing import timing
from blobchain.workers.chainjob import finalize_chain
from blobchain.workers.errors import InProgress
from blobchain.workers.executor import ChainResult
from blobchain.workers.progress import Progress, Throttle
from blobchain.workers.refjob import build_ref, flight_key
from blobchain.workers.retry import backoff

__all__ = [
    "BUILD_TASK",
    "FINALIZE_TASK",
    "PROGRESS",
    "UNAVAILABLE_RETRIES",
    "RefFailed",
    "RefTimedOut",
    "build_deps",
    "build_ref_task",
    "finalize_chain_task",
]

log = get_task_logger(__name__)

BUILD_TASK = "blobchain.build_ref"
FINALIZE_TASK = "blobchain.finalize_chain"
PROGRESS = "PROGRESS"
# Retries of a task whose S3 or Redis is unreachable, before it fails with Unavailable.
UNAVAILABLE_RETRIES = 4
_PROGRESS_EVERY_S = 0.5
_STATS_TTL_S = 30 * 86400


def build_deps(ctx: WorkerContext, options: LayerOptions, delivery: dict[str, Any] | None = None) -> Deps:
    """``ctx.deps`` for one of the pool's builds (they share the cores); with ``delivery``, the
    build's claim carries it (what to send again if this worker dies)."""
    deps = ctx.deps.sharing_cores(options, pool_size() or 1)
    if delivery is not None:
        deps = replace(deps, claims=ctx.claims.tracking(delivery))
    return deps


def stats_key(prefix: str, action: str, flight: str) -> str:
    """Counter of real work started per (ref, variant): ``stats:built:<ref>#<variant>`` (diffs)
    and ``stats:converted:<ref>#<variant>`` (recompressions of an existing blob)."""
    return f"{prefix}stats:{action}:{flight}"


class _Delivery:
    """One execution of a ``build_ref`` message: its arguments, how to send it again, and what
    it reports while it runs."""

    def __init__(
        self,
        task: Any,
        ref_id: str,
        opts: dict[str, Any],
        create_if_needed: bool,
        force: bool,
        wait_since: float | None,
        unavailable: int,
        takeover: dict[str, Any] | None,
    ) -> None:
        self.task = task
        self.ref_id = ref_id
        self.opts = opts
        self.create_if_needed = create_if_needed
        self.force = force
        self.wait_since = wait_since
        self.unavailable = unavailable
        self.takeover = takeover

    def kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"wait_since": self.wait_since, "unavailable": self.unavailable}
        if self.takeover is not None:
            kw["takeover"] = self.takeover
        return kw

    def args(self) -> list[Any]:
        return [self.ref_id, self.opts, self.create_if_needed, self.force]

    def again(self, e: BlobchainError, *, waiting: bool) -> Retry:
        """Retry this message later: ``waiting`` for another holder, else for a service."""
        kwargs = self.kwargs()
        if waiting:
            kwargs["wait_since"] = self.wait_since if self.wait_since is not None else time.time()
            n = self.task.request.retries
        else:
            kwargs["unavailable"] = self.unavailable + 1
            n = self.unavailable
        cap = timing(settings_of(self.task.app)).max_countdown_s
        retry: Retry = self.task.retry(
            args=self.args(), kwargs=kwargs, countdown=backoff(n, cap), exc=RefFailed.of(e)
        )
        return retry

    def record(self, flight: str) -> dict[str, Any]:
        """What a janitor needs to send this execution's task again: its message (as Celery's
        own retry rebuilds it: same id, same chord) and who runs it (for ``blobchain status``)."""
        request = self.task.request
        sig = self.task.signature_from_request(request, args=self.args(), kwargs=self.kwargs())
        message = json.loads(json.dumps(dict(sig), default=str))
        opts = message.get("options") or {}
        for k in ("redelivered", "is_eager", "delivery_tag"):
            opts.pop(k, None)
        return {
            "task_id": request.id or "",
            "ref": self.ref_id,
            "flight": flight,
            "host": request.hostname or "",
            "pid": os.getpid(),
            "since": time.time(),
            "message": message,
        }

    def progress(self) -> Progress:
        extra: dict[str, Any] = {"host": self.task.request.hostname or ""}
        if self.takeover is not None:
            extra["takeover"] = self.takeover.get("reason")

        def report(files: int, nbytes: int) -> None:
            try:
                meta = {"files": files, "bytes": nbytes, "pid": os.getpid(), **extra}
                self.task.update_state(state=PROGRESS, meta=meta)
            except Exception as e:  # progress is best effort; the build goes on
                log.debug("progress update failed: %s", e)

        return Throttle(report, _PROGRESS_EVERY_S)

    def outcome(self, action: str, record: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"ref": self.ref_id, "action": action, "record": record}
        if self.takeover is not None:
            out["takeover"] = self.takeover.get("reason")
            out["taken_over"] = {k: self.takeover.get(k) for k in ("from", "count", "at")}
        return out


def _counter(ctx: WorkerContext, flight: str) -> Any:
    def count_work(action: str) -> None:
        # Counted as the work starts, not after its commit: a diff that ran and then failed
        # (a crash, a lost claim, an S3 error) shows up, so "exactly once" is checkable.
        key = stats_key(ctx.prefix, action, flight)
        try:
            with redis_errors(ctx.redis, "count work"):
                pipe = ctx.redis.pipeline(transaction=True)
                pipe.incr(key)
                pipe.expire(key, _STATS_TTL_S)
                pipe.execute()
        except BlobchainError as e:
            log.warning("could not count %s: %s", flight, e)

    return count_work


def _failure(d: _Delivery, e: BaseException, settings_budget_s: float, flight: str) -> BaseException:
    """What the queue does with a build's error: the exception to raise (a Retry or RefFailed)."""
    if isinstance(e, (InProgress, ClaimLost)):
        started = d.wait_since if d.wait_since is not None else time.time()
        if time.time() - started > settings_budget_s:
            return RefFailed.of(
                InProgress(
                    f"ref {d.ref_id} was still being built by another worker after {settings_budget_s:.0f} s",
                    ref=d.ref_id,
                )
            )
        return d.again(e, waiting=True)
    if isinstance(e, Unavailable) and e.retryable and d.unavailable < UNAVAILABLE_RETRIES:
        log.warning("ref %s: %s (retry %d/%d)", flight, e, d.unavailable + 1, UNAVAILABLE_RETRIES)
        return d.again(e, waiting=False)
    if isinstance(e, BlobchainError):
        return RefFailed.of(e)
    if isinstance(e, SoftTimeLimitExceeded):
        limit = d.task.app.conf.task_soft_time_limit
        return RefFailed.of(
            RefTimedOut(f"building ref {d.ref_id} exceeded the soft time limit of {limit} s", ref=d.ref_id)
        )
    return e


@shared_task(bind=True, name=BUILD_TASK, acks_late=True, max_retries=None, track_started=True)
def build_ref_task(
    self: Any,
    ref_id: str,
    opts: dict[str, Any],
    create_if_needed: bool = True,
    force: bool = False,
    wait_since: float | None = None,
    unavailable: int = 0,
    takeover: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Make sure ``ref_id`` has its blob (``opts``: ``LayerOptions.to_dict()``). Returns
    ``{"ref", "action", "record"}`` (the record as ``RefRecord.to_dict()``), plus ``takeover``
    (the reason) when this delivery was sent again after its holder died."""
    # A message from before "force" travelled beside the options carries it inside them.
    force = force or bool(opts.get("force", False))
    d = _Delivery(self, ref_id, opts, create_if_needed, force, wait_since, unavailable, takeover)
    try:
        options = LayerOptions.from_dict(opts)
        ctx = worker_context(self.app)
    except BlobchainError as e:
        raise RefFailed.of(e) from None
    except Exception as e:  # broken configuration of this worker
        raise RefFailed("unavailable", f"worker cannot open its stores: {e}", {"ref": ref_id}) from None
    flight = flight_key(ref_id, options)

    attempt = Attempt(ctx.redis, ctx.prefix, flight, self.request.id or "")
    try:
        n, crashes = attempt.start()
    except Unavailable as e:
        if unavailable < UNAVAILABLE_RETRIES:
            raise d.again(e, waiting=False) from None
        raise RefFailed.of(e) from None
    limit = ctx.settings.max_attempts
    if crashes >= limit:
        # Leave this start counted: every later message of this ref fails at once too.
        log.error("ref %s crashed its worker %d times: failing it as poison", flight, crashes)
        raise RefFailed.of(
            PoisonRef(
                f"ref {ref_id} killed its worker {crashes} times (limit {limit}); not retried again",
                ref=ref_id,
                variant=options.variant_key(),
                crashes=crashes,
            )
        )
    if n > 1:
        log.warning("ref %s: start %d of this message (the previous one died)", flight, n)
    if takeover is not None:
        log.warning("ref %s: taking over: %s", flight, takeover.get("reason"))

    success = False
    try:
        progress = d.progress()
        if takeover is not None:
            progress(0, 0)
        outcome = build_ref(
            ref_id,
            options,
            build_deps(ctx, options, d.record(flight)),
            create_if_needed=create_if_needed,
            force=force,
            progress=progress,
            on_work=_counter(ctx, flight),
        )
        success = True
    except (BlobchainError, SoftTimeLimitExceeded) as e:
        raise _failure(d, e, ctx.settings.wait_budget_s, flight) from None
    finally:
        attempt.finish(success=success)
    return d.outcome(outcome.action, outcome.record.to_dict())


@shared_task(bind=True, name=FINALIZE_TASK, acks_late=True, max_retries=None)
def finalize_chain_task(
    self: Any, results: list[dict[str, Any]], ref_id: str, opts: dict[str, Any], unavailable: int = 0
) -> dict[str, Any]:
    """The chord body: set chain IDs parents first (idempotent) once every ref has its blob.
    Returns ``ChainResult.to_dict()`` plus ``records`` (each ``RefRecord.to_dict()``) and
    ``options``, from which the client rebuilds the ChainResult."""
    try:
        options = LayerOptions.from_dict(opts)
        ctx = worker_context(self.app)
        records = finalize_chain(ref_id, ctx.deps.metadata)
    except Unavailable as e:
        if e.retryable and unavailable < UNAVAILABLE_RETRIES:
            raise self.retry(
                args=[results, ref_id, opts],
                kwargs={"unavailable": unavailable + 1},
                countdown=backoff(unavailable, timing(settings_of(self.app)).max_countdown_s),
                exc=RefFailed.of(e),
            ) from None
        raise RefFailed.of(e) from None
    except BlobchainError as e:
        raise RefFailed.of(e) from None
    out = ChainResult(ref_id, tuple(records), options).to_dict()
    out["options"] = opts
    out["records"] = [r.to_dict() for r in records]
    out["actions"] = {r["ref"]: r["action"] for r in results if isinstance(r, dict) and "ref" in r}
    return out
