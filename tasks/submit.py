"""The client side of distributed mode: :class:`CeleryExecutor` sends a chain's chord to the
workers and :class:`CeleryJob` follows it, like ``workers.embedded`` does for local builds.

Only this (client) process waits: a poller thread per job reads each ref's task state from the
result backend (``STARTED``/``PROGRESS``/``RETRY``/``SUCCESS``/``FAILURE``) and turns it into
:class:`RefEvent` s; ``wait`` returns the :class:`ChainResult` rebuilt from the chord body's
result, or raises the first failing ref's error (chain order) as its own BlobchainError class.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from celery import Celery, states
from celery.backends.redis import RedisBackend
from celery.exceptions import TimeLimitExceeded, WorkerLostError
from kombu.exceptions import OperationalError

from blobchain.config.settings import Settings, redact_url
from blobchain.layers.errors import BlobchainError, Unavailable, from_code
from blobchain.layers.records import LayerOptions, RefRecord
from blobchain.storage.deps import Deps
from blobchain.tasks.app import make_app
from blobchain.tasks.canvas import chain_signature
from blobchain.tasks.errors import RefFailed, RefTimedOut
from blobchain.tasks.layer_tasks import PROGRESS
from blobchain.tasks.poison import PoisonRef
from blobchain.workers.chainjob import chain_records
from blobchain.workers.executor import (
    FAILED,
    QUEUED,
    RUNNING,
    WAITING,
    ChainResult,
    JobState,
    RefEvent,
    error_dict,
)

__all__ = ["CeleryExecutor", "CeleryJob", "PollingRedisBackend", "task_error"]

_POLL_MIN_S = 0.05
_POLL_MAX_S = 0.5
# How long the result backend may stay unreachable before the job fails with Unavailable.
_BACKEND_DOWN_S = 30.0
# How often the poller checks that the chain's records still exist (a Redis that restarted
# empty loses queued work and results: fail clearly instead of waiting forever).
_LOST_CHECK_S = 2.0


class PollingRedisBackend(RedisBackend):
    """The client's result backend: jobs poll task states, so sending a task or building a
    result set does not subscribe to result channels (Celery's default). That keeps a pubsub
    connection per thread and the unsubscribe in ``AsyncResult.__del__`` (which blocks up to 20 s
    on reconnects when Redis is down) out of the client."""

    def on_task_call(self, producer: Any, task_id: str) -> None:
        return None

    def add_pending_result(self, result: Any, weak: bool = False, start_drainer: bool = True) -> Any:
        return result  # GroupResult/AsyncResult.then() would subscribe: we poll instead

    def remove_pending_result(self, result: Any) -> Any:
        return result


def task_error(exc: Any, ref_id: str | None = None) -> BlobchainError:
    """A task's stored failure as a BlobchainError of the class the worker raised."""
    if isinstance(exc, RefFailed):
        return exc.error()
    if isinstance(exc, BlobchainError):
        return exc
    if isinstance(exc, TimeLimitExceeded):
        return RefTimedOut(f"building ref {ref_id} exceeded the hard time limit ({exc})", ref=ref_id or "")
    if isinstance(exc, WorkerLostError):
        return PoisonRef(f"the worker building ref {ref_id} died: {exc}", ref=ref_id or "")
    return from_code(
        "internal", f"task for ref {ref_id} failed: {type(exc).__name__}: {exc}", {"ref": ref_id or ""}
    )


class CeleryJob:
    """One submitted chain (see the module docstring). Implements ``workers.executor.Job``."""

    def __init__(
        self,
        executor: CeleryExecutor,
        ref_id: str,
        chain: list[str],
        header_ids: list[str],
        body_id: str,
        opts: LayerOptions,
    ) -> None:
        self._executor = executor
        self._ref_id = ref_id
        self._chain = chain
        self._ids = dict(zip(chain, header_ids, strict=True))
        self._body_id = body_id
        self._opts = opts
        self._state = JobState(chain)
        self._finished = threading.Event()
        self._stop = threading.Event()
        self._result: ChainResult | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._poll, name=f"blobchain-follow-{ref_id}", daemon=True)
        self._thread.start()

    @property
    def ref_id(self) -> str:
        return self._ref_id

    @property
    def task_ids(self) -> dict[str, str]:
        """Each ref's build task id (and ``"finalize"``: the chord body's)."""
        return {**self._ids, "finalize": self._body_id}

    def wait(self, timeout: float | None = None) -> ChainResult:
        if not self._finished.wait(timeout):
            raise TimeoutError(f"chain {self._ref_id} not done after {timeout}s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def done(self) -> bool:
        return self._finished.is_set()

    def progress(self) -> dict[str, RefEvent]:
        return self._state.snapshot()

    def events(self, timeout: float | None = None) -> Iterator[RefEvent]:
        return self._state.events(timeout)

    def stop(self) -> None:
        """Stop following (the workers go on; the job ends as cancelled if not done)."""
        self._stop.set()

    # --- the poller ---------------------------------------------------------------------------

    def _finish(self, result: ChainResult | None = None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self._finished.set()
        self._state.finish()

    def _poll(self) -> None:
        try:
            self._follow()
        except BaseException as e:  # never leave a waiter hanging
            self._finish(error=e if isinstance(e, BlobchainError) else from_code("internal", repr(e)))

    def _follow(self) -> None:
        app = self._executor.app
        backend = app.backend  # thread-local: this thread's own connection
        errors = (
            *tuple(getattr(backend, "connection_errors", ())),
            OperationalError,
            ConnectionError,
            OSError,
        )
        seen: dict[str, tuple[Any, ...]] = {}
        started: set[str] = set()
        down_since: float | None = None
        next_lost_check = time.monotonic() + _LOST_CHECK_S
        interval = _POLL_MIN_S
        while not self._stop.is_set():
            lost = False
            try:
                # The final step runs only after every ref's result is stored, so reading it
                # first means a finished chain is always seen with every ref's final state.
                body = backend.get_task_meta(self._body_id)
                metas = {r: backend.get_task_meta(tid) for r, tid in self._ids.items()}
                if time.monotonic() >= next_lost_check:
                    next_lost_check = time.monotonic() + _LOST_CHECK_S
                    lost = self._executor.deps.metadata.get(self._ref_id) is None
                down_since = None
            except (*errors, Unavailable) as e:
                now = time.monotonic()
                down_since = down_since or now
                if now - down_since > _BACKEND_DOWN_S:
                    where = redact_url(self._executor.settings.redis_urls()[1])
                    self._finish(
                        error=Unavailable(
                            f"result backend {where} unreachable for {_BACKEND_DOWN_S:.0f} s while following "
                            f"chain {self._ref_id}: {e}",
                            ref=self._ref_id,
                        )
                    )
                    return
                self._stop.wait(0.5)
                continue
            if lost:
                self._finish(
                    error=Unavailable(
                        f"ref {self._ref_id} vanished from the metadata store (Redis restarted without "
                        "persistence?); register and submit the chain again",
                        ref=self._ref_id,
                    )
                )
                return

            failures: list[tuple[str, Any]] = []
            ready = 0
            for r in self._chain:
                meta = metas[r]
                status = meta.get("status", states.PENDING)
                if status != states.PENDING:
                    started.add(r)
                elif r in started:
                    self._finish(
                        error=Unavailable(
                            f"the state of ref {r} vanished from the result backend (Redis restarted "
                            f"without persistence?); resubmit chain {self._ref_id}",
                            ref=r,
                        )
                    )
                    return
                ev = self._event(r, status, meta.get("result"))
                key = (ev.state, ev.files, ev.bytes, ev.note)
                if seen.get(r) != key:
                    seen[r] = key
                    self._state.update(ev)
                if status in states.READY_STATES:
                    ready += 1
                    if status != states.SUCCESS:
                        failures.append((r, meta.get("result")))
            if failures and ready == len(self._chain):
                r, exc = failures[0]
                self._finish(error=task_error(exc, r))
                return
            status = body.get("status", states.PENDING)
            if status == states.SUCCESS:
                self._finish(result=self._rebuild(body["result"]))
                return
            if status in states.READY_STATES:
                if failures:
                    r, exc = failures[0]
                    self._finish(error=task_error(exc, r))
                else:
                    self._finish(error=task_error(body.get("result"), self._ref_id))
                return
            self._stop.wait(interval)
            interval = min(_POLL_MAX_S, interval * 1.5)
        if not self._finished.is_set():
            self._finish(error=from_code("cancelled", f"stopped following chain {self._ref_id}", {}))

    def _event(self, ref_id: str, status: str, result: Any) -> RefEvent:
        if status == states.SUCCESS and isinstance(result, dict):
            rec = RefRecord.from_dict(result["record"])
            blob = rec.blob_for(self._opts) or rec.blob
            note = result.get("takeover")
            return RefEvent(ref_id, str(result.get("action", "cached")), 0, blob.size if blob else 0, note=note)
        if status in states.READY_STATES:
            return RefEvent(ref_id, FAILED, error=error_dict(task_error(result, ref_id)))
        if status == PROGRESS and isinstance(result, dict):
            files, nbytes = int(result.get("files", 0)), int(result.get("bytes", 0))
            return RefEvent(ref_id, RUNNING, files, nbytes, note=result.get("takeover"))
        if status == states.RETRY:
            err = error_dict(task_error(result, ref_id)) if result is not None else None
            return RefEvent(ref_id, WAITING, error=err)
        if status == states.STARTED:
            return RefEvent(ref_id, RUNNING)
        return RefEvent(ref_id, QUEUED)

    def _rebuild(self, data: dict[str, Any]) -> ChainResult:
        records = tuple(RefRecord.from_dict(d) for d in data["records"])
        return ChainResult(self._ref_id, records, self._opts)


class CeleryExecutor:
    """Sends chains to Celery workers. Implements ``workers.executor.Executor``.

    ``app`` defaults to ``make_app(settings)``; ``deps`` (the client's view of the stores) is used
    to list the chain before submitting, so bad refs fail here, at once, as in embedded mode.
    """

    def __init__(self, settings: Settings, deps: Deps, *, app: Celery | None = None) -> None:
        if not settings.distributed:
            raise ValueError("CeleryExecutor needs distributed settings (BLOBCHAIN_BROKER_URL)")
        self.settings = settings
        if app is None:
            backend = f"{__name__}:{PollingRedisBackend.__name__}+{settings.redis_urls()[1]}"
            app = make_app(settings, result_backend=backend)
            self._own_app = True
        else:
            self._own_app = False
        self.app = app
        self.deps = deps
        self._jobs: list[CeleryJob] = []
        self._lock = threading.Lock()

    def submit(
        self, ref_id: str, opts: LayerOptions, *, create_if_needed: bool = True, force: bool = False
    ) -> CeleryJob:
        chain = [r.ref_id for r in chain_records(ref_id, self.deps.metadata)]
        header_ids = [str(uuid.uuid4()) for _ in chain]
        body_id = str(uuid.uuid4())
        sig = chain_signature(
            self.app, chain, opts, create_if_needed, ref_id, force=force, header_ids=header_ids, body_id=body_id
        )
        errors = (
            *tuple(getattr(self.app.backend, "connection_errors", ())),
            OperationalError,
            ConnectionError,
        )
        try:
            sig.apply_async()
        except errors as e:
            raise Unavailable(
                f"could not submit chain {ref_id} to broker {redact_url(str(self.app.conf.broker_url))}: {e}",
                ref=ref_id,
            ) from e
        job = CeleryJob(self, ref_id, chain, header_ids, body_id, opts)
        with self._lock:
            self._jobs = [j for j in self._jobs if not j.done()] + [job]
        return job

    def close(self, *, cancel: bool = False) -> None:
        """Stop following jobs (``cancel``: also those not done; the workers finish them anyway)."""
        with self._lock:
            jobs, self._jobs = self._jobs, []
        for job in jobs:
            if cancel:
                job.stop()
        if self._own_app:
            self.app.close()

    def __enter__(self) -> CeleryExecutor:
        return self

    def __exit__(self, et: object, e: object, tb: object) -> None:
        self.close(cancel=e is not None)
