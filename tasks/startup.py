"""A Celery worker's start-up: the one place in ``tasks`` that opens stores.

Each worker process (a prefork child, or the worker itself for the solo pool) opens its stores
once, through ``config.factory`` (the composition point), after the fork and never inherited
from the parent (``worker_process_init``, or lazily on a task's first use); tasks receive them as
a :class:`WorkerContext`. At worker start the pool size is noted (builds split the cores), stale
uploads of long-dead workers are swept, and the takeover janitor is started with stores of its
own; it stops with the worker.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutdown

from blobchain.config.factory import open_distributed
from blobchain.config.settings import Settings, load_settings
from blobchain.storage.claims.redis import RedisClaimService
from blobchain.storage.deps import Deps
from blobchain.tasks.janitor import Janitor

__all__ = ["WorkerContext", "pool_size", "settings_of", "worker_context"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerContext:
    """One worker process's stores: the ``Deps`` builds use, and the Redis side the tasks need
    themselves (tracked claims, attempt and work counters)."""

    settings: Settings
    deps: Deps
    claims: RedisClaimService
    redis: redis.Redis

    @property
    def prefix(self) -> str:
        return self.settings.key_prefix


def settings_of(app: Celery) -> Settings:
    """The settings an app was made from (apps made elsewhere: the environment's)."""
    s: Settings | None = getattr(app, "blobchain_settings", None)
    if s is None:
        s = load_settings()
        app.blobchain_settings = s  # type: ignore[attr-defined]  # Celery apps take attributes
    return s


def _open(settings: Settings) -> WorkerContext:
    stores = open_distributed(settings)
    return WorkerContext(settings, stores.deps, stores.claims, stores.redis)


_contexts: dict[tuple[int, int], WorkerContext] = {}
_contexts_lock = threading.Lock()


def worker_context(app: Celery) -> WorkerContext:
    """This process's stores for ``app`` (opened on first use; a forked child opens its own)."""
    key = (os.getpid(), id(app))
    ctx = _contexts.get(key)
    if ctx is None:
        with _contexts_lock:
            ctx = _contexts.get(key)
            if ctx is None:
                ctx = _contexts[key] = _open(settings_of(app))
    return ctx


# The worker's pool size, noted before the pool forks its children: that many builds may run at
# once on this machine, so each takes its share of the cores (see ``threads_for_share``).
_pool_size: int | None = None


def pool_size() -> int | None:
    return _pool_size


@worker_init.connect(weak=False)
def _note_pool_size(sender: Any = None, **_: Any) -> None:
    global _pool_size
    size = getattr(sender, "concurrency", None)
    _pool_size = size if isinstance(size, int) and size > 0 else None  # "auto": not known yet


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

    app = getattr(sender, "app", None)
    if app is None:
        return

    def sweep() -> None:
        try:
            n = _open(settings_of(app)).deps.content.sweep(INGEST_MAX_AGE_S)
        except Exception as e:  # gc sweeps them too; never stop a worker for this
            log.warning("could not sweep stale uploads at start-up: %s", e)
            return
        if n:
            log.info("swept %d stale uploads at start-up", n)

    threading.Thread(target=sweep, name="blobchain-sweep", daemon=True).start()


_janitors: dict[int, Janitor] = {}


@worker_ready.connect(weak=False)
def _start_janitor(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    settings = getattr(app, "blobchain_settings", None)
    if app is None or settings is None or not settings.distributed or not settings.takeover_poll_s:
        return
    try:
        claims = _open(settings).claims
    except Exception as e:
        log.error("takeover janitor not started: %s", e)
        return
    _janitors[id(app)] = Janitor(app, settings, claims, getattr(sender, "hostname", None)).start()


@worker_shutdown.connect(weak=False)
def _stop_janitor(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    j = _janitors.pop(id(app), None) if app is not None else None
    if j is not None:
        j.stop()
