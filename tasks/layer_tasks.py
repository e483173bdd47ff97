"""The Celery tasks: thin adapters over ``workers.refjob.build_ref`` and
``workers.chainjob.finalize_chain``.

Each task maps the engine's errors to what a queue should do with them:

- ``InProgress`` (another worker holds the ref's lease) and ``ClaimLost``: retry later with capped
  exponential backoff and jitter (the worker slot is freed meanwhile), for at most
  ``settings.wait_budget_s`` in total, then fail with ``InProgress``.
- ``Unavailable`` (S3 or Redis down): a few retries with backoff, then fail with the error.
- any other ``BlobchainError`` (bad input, missing blob, ...): fail at once.
- a ref whose build keeps killing its worker (SIGKILL, OOM, segfault: the message comes back
  each time) fails with ``PoisonRef`` once it crashed ``settings.max_attempts`` times. (Celery
  5.7's ``task_retry_on_worker_lost`` is not used: it shares ``max_retries`` with our waiting
  retries, waits ``default_retry_delay`` and does nothing when the whole worker dies; our
  counter in Redis covers a dead pool child and a dead worker alike.)
- the soft time limit: fail with ``RefTimedOut`` (the hard limit's ``TimeLimitExceeded`` is
  mapped to it by the client).

Takeover: the build's lease carries this task's message (``storage.claims.redis``: a tracked
lease). If the worker dies (or is cut off) its lease expires without a release, and a worker's
janitor (``tasks.janitor``) sends the same task (same id, same chord) again at once, with
``takeover={"reason", ...}``: the broker's own redelivery, after the visibility timeout, is not
waited for. The message it finally restores finds the task done and is skipped
(``worker_deduplicate_successful_tasks``); the chord counts each header task once.

Failures cross the result backend as :class:`RefFailed` (JSON-friendly: code, message,
details), so the client rebuilds the same ``BlobchainError`` subclass. Tasks never wait on other
tasks; each process opens its stores once (``worker_process_init``, or lazily on first use).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

from celery import Celery, shared_task
from celery.exceptions import Retry, SoftTimeLimitExceeded
from celery.signals import worker_init, worker_process_init, worker_ready
from celery.utils.log import get_task_logger

from blobchain.config.factory import open_deps
from blobchain.config.settings import Settings
from blobchain.layers.errors import (
    BlobchainError,
    FailedPrecondition,
    InProgress,
    PoisonRef,
    Unavailable,
    from_code,
    register,
)
from blobchain.layers.records import LayerOptions
from blobchain.storage.claims import ClaimLost
from blobchain.workers.chainjob import finalize_chain
from blobchain.workers.deps import Deps
from blobchain.workers.executor import ChainResult, error_dict
from blobchain.workers.refjob import build_ref, flight_key

__all__ = [
    "BUILD_TASK",
    "FINALIZE_TASK",
    "PROGRESS",
    "UNAVAILABLE_RETRIES",
    "RefFailed",
    "RefTimedOut",
    "WorkerContext",
    "build_deps",
    "build_ref_task",
    "finalize_chain_task",
    "worker_context",
]

log = get_task_logger(__name__)

BUILD_TASK = "blobchain.build_ref"
FINALIZE_TASK = "blobchain.finalize_chain"
PROGRESS = "PROGRESS"
# Retries of a task whose S3 or Redis is unreachable, before it fails with Unavailable.
UNAVAILABLE_RETRIES = 4
_PROGRESS_EVERY_S = 0.5
_FIRST_BACKOFF_S = 0.25
# The crash history of a ref outlives the retries of every message carrying it.
_ATTEMPTS_TTL_S = 6 * 3600
_STATS_TTL_S = 30 * 86400


class RefFailed(Exception):
    """A ref's or chain's error on its way through the result backend.

    ``args`` are ``(code, message, details)``: JSON-serializable, so Celery stores and rebuilds
    it (the client imports this module); :meth:`error` gives back the BlobchainError subclass.
    """

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(code, message, details or {})

    @classmethod
    def of(cls, e: BaseException) -> RefFailed:
        d = error_dict(e)
        return cls(d["code"], d["message"], d.get("details") or {})

    @property
    def code(self) -> str:
        return str(self.args[0])

    @property
    def message(self) -> str:
        return str(self.args[1])

    @property
    def details(self) -> dict[str, Any]:
        return dict(self.args[2] or {})

    def error(self) -> BlobchainError:
        return from_code(self.code, self.message, self.details)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@register
class RefTimedOut(FailedPrecondition):
    """Building the ref took longer than the worker's time limit."""

    code = "ref_timed_out"


# --- one set of stores per worker process -----------------------------------------------------


@dataclass(frozen=True)
class WorkerContext:
    settings: Settings
    deps: Deps

    @property
    def redis(self) -> Any:
        """The Redis client of the lock service (attempt counters and stats live beside the leases)."""
        return self.deps.claims.client  # type: ignore[attr-defined]

    @property
    def prefix(self) -> str:
        return self.settings.key_prefix


_contexts: dict[tuple[int, int], WorkerContext] = {}
_contexts_lock = threading.Lock()


def worker_context(app: Celery) -> WorkerContext:
    """This process's stores for ``app`` (opened on first use; a forked child opens its own)."""
    key = (os.getpid(), id(app))
    ctx = _contexts.get(key)
    if ctx is None:
        from blobchain.tasks.app import settings_of

        with _contexts_lock:
            ctx = _contexts.get(key)
            if ctx is None:
                settings = settings_of(app)
                ctx = WorkerContext(settings, open_deps(settings))
                _contexts[key] = ctx
    return ctx


# The worker's pool size, noted before the pool forks its children: that many builds may run at
# once on this machine, so each takes its share of the cores (see ``threads_for_share``).
_pool_size: int | None = None


@worker_init.connect(weak=False)
def _note_pool_size(sender: Any = None, **_: Any) -> None:
    global _pool_size
    size = getattr(sender, "concurrency", None)
    _pool_size = size if isinstance(size, int) and size > 0 else None  # "auto": not known yet


def build_deps(ctx: WorkerContext, options: LayerOptions, delivery: dict[str, Any] | None = None) -> Deps:
    """``ctx.deps`` for one of the pool's builds (they share the cores); with ``delivery``, the
    build's lease carries it (what to send again if this worker dies)."""
    deps = ctx.deps.sharing_cores(options, _pool_size or 1)
    tracking = getattr(deps.claims, "tracking", None)
    if delivery is not None and tracking is not None:
        deps = replace(deps, claims=tracking(delivery))
    return deps


def delivery_of(task: Any, ref_id: str, flight: str, args: list[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """What a janitor needs to send this execution's task again: its message (as Celery's own
    retry rebuilds it: same id, same chord) and who runs it (for ``blobchain status``)."""
    sig = task.signature_from_request(task.request, args=args, kwargs=kwargs)
    message = json.loads(json.dumps(dict(sig), default=str))
    opts = message.get("options") or {}
    for k in ("redelivered", "is_eager", "delivery_tag"):
        opts.pop(k, None)
    return {
        "task_id": task.request.id or "",
        "ref": ref_id,
        "flight": flight,
        "host": task.request.hostname or "",
        "pid": os.getpid(),
        "since": time.time(),
        "message": message,
    }


@worker_process_init.connect(weak=False)
def _open_stores(**_: Any) -> None:
    # Prefork child: open S3/Redis clients here, after the fork, never inherited from the parent.
    from celery import current_app

    try:
        worker_context(current_app)
    except Exception as e:  # the first task reports it with its own error mapping
        log.error("could not open blobchain stores in worker process: %s", e)


@worker_ready.connect(weak=False)
def _sweep_stale_ingests(sender: Any = None, **_: Any) -> None:
    """At start-up, drop uploads left by workers killed long ago (a dead holder's recent ones
    go when a new holder takes its ref over, see ``refjob``). In a thread, on stores of its
    own: the pool's children never inherit them, and a slow listing delays no task."""
    from blobchain.storage.gc import INGEST_MAX_AGE_S
    from blobchain.tasks.app import settings_of

    app = getattr(sender, "app", None)
    if app is None:
        return

    def sweep() -> None:
        try:
            n = open_deps(settings_of(app)).content.sweep(INGEST_MAX_AGE_S)
        except Exception as e:  # gc sweeps them too; never stop a worker for this
            log.warning("could not sweep stale uploads at start-up: %s", e)
            return
        if n:
            log.info("swept %d stale uploads at start-up", n)

    threading.Thread(target=sweep, name="blobchain-sweep", daemon=True).start()


# --- crash accounting (poison refs) -----------------------------------------------------------

# KEYS[1] = attempts hash of a (ref, variant); ARGV[1] = task id, ARGV[2] = ttl ms.
# Each field counts the unfinished starts of one message (task id): a normal exit takes its start
# back, a crash leaves it. Returns this start's number and the crashes seen on the ref: ours
# (n - 1) plus, for other messages, all but the one start that may be running now.
_START = """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local crashes = n - 1
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if all[i] ~= ARGV[1] then
    local v = tonumber(all[i + 1])
    if v > 1 then crashes = crashes + v - 1 end
  end
end
return {n, crashes}
"""

_FINISH = """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return n
"""


def _redis_call(ctx: WorkerContext, what: str, fn: Any) -> Any:
    from blobchain.storage.redis_util import redis_errors

    with redis_errors(ctx.redis, what):
        return fn()


def attempts_key(prefix: str, flight: str) -> str:
    return f"{prefix}attempts:{flight}"


def stats_key(prefix: str, action: str, flight: str) -> str:
    """Counter of real work started per (ref, variant): ``stats:built:<ref>#<variant>`` (diffs)
    and ``stats:converted:<ref>#<variant>`` (recompressions of an existing blob)."""
    return f"{prefix}stats:{action}:{flight}"


class _Attempt:
    """Counts this execution as a start of the ref's build; see ``_START``."""

    def __init__(self, ctx: WorkerContext, flight: str, task_id: str) -> None:
        self.ctx = ctx
        self.key = attempts_key(ctx.prefix, flight)
        self.task_id = task_id

    def start(self) -> tuple[int, int]:
        script = self.ctx.redis.register_script(_START)
        n, crashes = _redis_call(
            self.ctx,
            f"count attempts of {self.key}",
            lambda: script(keys=[self.key], args=[self.task_id, _ATTEMPTS_TTL_S * 1000]),
        )
        return int(n), int(crashes)

    def finish(self, *, success: bool) -> None:
        try:
            if success:
                _redis_call(self.ctx, "clear attempts", lambda: self.ctx.redis.delete(self.key))
            else:
                script = self.ctx.redis.register_script(_FINISH)
                _redis_call(self.ctx, "finish attempt", lambda: script(keys=[self.key], args=[self.task_id]))
        except BlobchainError as e:  # leaves a start counted: errs towards PoisonRef, never a loop
            log.warning("could not update attempt count %s: %s", self.key, e)


# --- retry policy -----------------------------------------------------------------------------


def backoff(attempt: int, cap_s: float) -> float:
    """Capped exponential backoff with jitter: 0.25 s, 0.5 s, 1 s, ... up to ``cap_s``."""
    base = min(cap_s, _FIRST_BACKOFF_S * 2 ** max(0, attempt))
    return min(cap_s, base * (0.5 + random.random()))


def _cap(task: Any) -> float:
    from blobchain.tasks.app import settings_of, timing

    return timing(settings_of(task.app)).max_countdown_s


def _progress_reporter(task: Any, takeover: dict[str, Any] | None = None) -> Any:
    last = [0.0]
    extra: dict[str, Any] = {"host": task.request.hostname or ""}
    if takeover is not None:
        extra["takeover"] = takeover.get("reason")

    def progress(files: int, nbytes: int) -> None:
        now = time.monotonic()
        if now - last[0] < _PROGRESS_EVERY_S:
            return
        last[0] = now
        try:
            meta = {"files": files, "bytes": nbytes, "pid": os.getpid(), **extra}
            task.update_state(state=PROGRESS, meta=meta)
        except Exception as e:  # progress is best effort; the build goes on
            log.debug("progress update failed: %s", e)

    return progress


# --- the tasks --------------------------------------------------------------------------------


@shared_task(bind=True, name=BUILD_TASK, acks_late=True, max_retries=None, track_started=True)
def build_ref_task(
    self: Any,
    ref_id: str,
    opts: dict[str, Any],
    create_if_needed: bool = True,
    wait_since: float | None = None,
    unavailable: int = 0,
    takeover: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Make sure ``ref_id`` has its blob (``opts``: ``LayerOptions.to_dict()``). Returns
    ``{"ref", "action", "record"}`` (the record as ``RefRecord.to_dict()``), plus ``takeover``
    (the reason) when this delivery was sent again after its holder died."""
    try:
        options = LayerOptions.from_dict(opts)
        ctx = worker_context(self.app)
    except BlobchainError as e:
        raise RefFailed.of(e) from None
    except Exception as e:  # broken configuration of this worker
        raise RefFailed("unavailable", f"worker cannot open its stores: {e}", {"ref": ref_id}) from None
    flight = flight_key(ref_id, options)
    settings = ctx.settings

    def again(e: BlobchainError, *, waiting: bool) -> Retry:
        kwargs: dict[str, Any] = {"wait_since": wait_since, "unavailable": unavailable}
        if takeover is not None:
            kwargs["takeover"] = takeover
        if waiting:
            kwargs["wait_since"] = wait_since if wait_since is not None else time.time()
            n = self.request.retries
        else:
            kwargs["unavailable"] = unavailable + 1
            n = unavailable
        return self.retry(
            args=[ref_id, opts, create_if_needed],
            kwargs=kwargs,
            countdown=backoff(n, _cap(self)),
            exc=RefFailed.of(e),
        )

    attempt = _Attempt(ctx, flight, self.request.id or "")
    try:
        n, crashes = attempt.start()
    except Unavailable as e:
        if unavailable < UNAVAILABLE_RETRIES:
            raise again(e, waiting=False) from None
        raise RefFailed.of(e) from None
    if crashes >= settings.max_attempts:
        # Leave this start counted: every later message of this ref fails at once too.
        log.error("ref %s crashed its worker %d times: failing it as poison", flight, crashes)
        raise RefFailed.of(
            PoisonRef(
                f"ref {ref_id} killed its worker {crashes} times (limit {settings.max_attempts}); "
                "not retried again",
                ref=ref_id,
                variant=options.variant_key(),
                crashes=crashes,
            )
        )
    if n > 1:
        log.warning("ref %s: start %d of this message (the previous one died)", flight, n)
    if takeover is not None:
        log.warning("ref %s: taking over: %s", flight, takeover.get("reason"))

    def count_work(action: str) -> None:
        # Counted as the work starts, not after its commit: a diff that ran and then failed
        # (a crash, a lost lease, an S3 error) shows up, so "exactly once" is checkable.
        key = stats_key(ctx.prefix, action, flight)
        try:
            _redis_call(ctx, "count work", lambda: _incr(ctx, key))
        except BlobchainError as e:
            log.warning("could not count %s: %s", flight, e)

    kwargs: dict[str, Any] = {"wait_since": wait_since, "unavailable": unavailable}
    if takeover is not None:
        kwargs["takeover"] = takeover
    success = False
    try:
        progress = _progress_reporter(self, takeover)
        if takeover is not None:
            progress(0, 0)
        outcome = build_ref(
            ref_id,
            options,
            build_deps(ctx, options, delivery_of(self, ref_id, flight, [ref_id, opts, create_if_needed], kwargs)),
            create_if_needed=create_if_needed,
            progress=progress,
            on_work=count_work,
        )
        success = True
    except (InProgress, ClaimLost) as e:
        started = wait_since if wait_since is not None else time.time()
        if time.time() - started > settings.wait_budget_s:
            raise RefFailed.of(
                InProgress(
                    f"ref {ref_id} was still being built by another worker after "
                    f"{settings.wait_budget_s:.0f} s",
                    ref=ref_id,
                )
            ) from None
        raise again(e, waiting=True) from None
    except Unavailable as e:
        if e.retryable and unavailable < UNAVAILABLE_RETRIES:
            log.warning("ref %s: %s (retry %d/%d)", flight, e, unavailable + 1, UNAVAILABLE_RETRIES)
            raise again(e, waiting=False) from None
        raise RefFailed.of(e) from None
    except BlobchainError as e:
        raise RefFailed.of(e) from None
    except SoftTimeLimitExceeded:
        raise RefFailed.of(
            RefTimedOut(
                f"building ref {ref_id} exceeded the soft time limit of {self.app.conf.task_soft_time_limit} s",
                ref=ref_id,
            )
        ) from None
    finally:
        attempt.finish(success=success)

    out: dict[str, Any] = {"ref": ref_id, "action": outcome.action, "record": outcome.record.to_dict()}
    if takeover is not None:
        out["takeover"] = takeover.get("reason")
        out["taken_over"] = {k: takeover.get(k) for k in ("from", "count", "at")}
    return out


def _incr(ctx: WorkerContext, key: str) -> None:
    pipe = ctx.redis.pipeline(transaction=True)
    pipe.incr(key)
    pipe.expire(key, _STATS_TTL_S)
    pipe.execute()


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
                countdown=backoff(unavailable, _cap(self)),
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
