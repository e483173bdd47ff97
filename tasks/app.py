"""The Celery app of blobchain's distributed mode: broker and results in Redis, one queue.

``make_app(settings)`` builds an app from :class:`Settings`; the module-level ``app`` (for
``celery -A blobchain.tasks.app worker|flower``) is built lazily from the environment
(``BLOBCHAIN_*``) the first time it is looked up, so importing this module opens nothing.

Reliability settings (see docs/configuration.md, "When a worker dies"): late acks with requeue
on a lost pool child, one reserved message per slot, time limits from the settings
(:mod:`.timing`), and a visibility timeout above the hard limit plus the longest retry
countdown, so that no message is redelivered while its task can still be running or waiting
for its retry.
"""

from __future__ import annotations

import ssl
import threading
from typing import Any

from celery import Celery
from celery.signals import worker_init

from blobchain.config.settings import Settings, load_settings
from blobchain.tasks.timing import SOFT_SHUTDOWN_S, Timing, timing

__all__ = [
    "QUEUE",
    "SOFT_SHUTDOWN_S",
    "TASK_MODULES",
    "Timing",
    "celery_config",
    "make_app",
    "timing",
]

QUEUE = "blobchain"
TASK_MODULES = ("blobchain.tasks.layer_tasks", "blobchain.tasks.startup")
# Result and chord bookkeeping lifetime: longer than any chain's total run time.
RESULT_EXPIRES_S = 7 * 86400


def _ssl_options(settings: Settings, url: str) -> dict[str, Any] | None:
    if not url.startswith("rediss://"):
        return None
    opts: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if settings.redis_tls_ca:
        opts["ssl_ca_certs"] = settings.redis_tls_ca
    return opts


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for ``settings`` (a plain dict: tests and tools can inspect it)."""
    broker, results, _locks = settings.redis_urls()
    t = timing(settings)
    transport = {
        "visibility_timeout": t.visibility_timeout_s,
        # Sweep for unacked messages of dead workers every 5 s instead of kombu's ~100 s.
        "unacked_restore_interval": 5 if t.visibility_timeout_s >= 60 else 1,
        "unacked_restore_throttle": 1,
        "global_keyprefix": settings.key_prefix,
        # Notice a vanished broker instead of waiting on a dead socket forever.
        "socket_timeout": 30,
        "socket_connect_timeout": 5,
        "socket_keepalive": True,
        "health_check_interval": 25,
    }
    conf: dict[str, Any] = {
        "broker_url": broker,
        "result_backend": results,
        "broker_transport_options": transport,
        "result_backend_transport_options": {
            "global_keyprefix": settings.key_prefix,
            "visibility_timeout": t.visibility_timeout_s,
        },
        "visibility_timeout": t.visibility_timeout_s,
        "broker_connection_retry_on_startup": True,
        "redis_socket_timeout": 30,
        "redis_socket_connect_timeout": 5,
        "redis_backend_health_check_interval": 25,
        # Serialization: JSON only (no pickle from the network).
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # One queue for everything blobchain does.
        "task_default_queue": QUEUE,
        "task_routes": {"blobchain.*": {"queue": QUEUE}},
        "task_create_missing_queues": True,
        # Reliability: ack after the work; a dead pool child requeues its message (our attempt
        # counter turns a ref that keeps killing workers into PoisonRef instead of a loop).
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # A message the broker restores after a takeover finished its task is acked unrun.
        "worker_deduplicate_successful_tasks": True,
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": t.soft_time_limit_s,
        "task_time_limit": t.time_limit_s,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # The soft shutdown lets running layers finish for up to this long (Celery then sleeps
        # the whole window, done or not). Not when idle: an idle worker stops at once.
        "worker_soft_shutdown_timeout": t.soft_shutdown_s,
        "worker_enable_soft_shutdown_on_idle": False,
        # Events for Flower and for the client's progress display.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        "result_expires": RESULT_EXPIRES_S,
        "result_chord_expires": RESULT_EXPIRES_S,
    }
    if (opts := _ssl_options(settings, broker)) is not None:
        conf["broker_use_ssl"] = opts
    if (opts := _ssl_options(settings, results)) is not None:
        conf["redis_backend_use_ssl"] = opts
    return conf


def make_app(settings: Settings, *, main: str = "blobchain", **overrides: Any) -> Celery:
    """A Celery app for ``settings`` with blobchain's tasks registered. ``overrides`` update the
    configuration (for tests and tools; production uses the settings alone)."""
    app = Celery(main, set_as_current=False)
    app.conf.update(celery_config(settings))
    if overrides:
        app.conf.update(overrides)
    app.blobchain_settings = settings  # type: ignore[attr-defined]  # Celery apps take attributes
    # Importing the task module registers its shared tasks on every app, this one included;
    # the start-up module connects the stores and the takeover janitor to worker start and stop.
    import blobchain.tasks.layer_tasks
    import blobchain.tasks.startup  # noqa: F401

    app.conf.include = list(TASK_MODULES)
    return app


def harden_kombu() -> None:
    """Keep a worker alive when its Redis connection drops while it holds unacked messages.

    Celery 5.7 handles a broker connection loss by ``Connection.collect()`` (which detaches the
    kombu transport from its channels) and then closing the connection; kombu 5.7's Redis
    channel then tries to put its unacked messages back, or a finishing late-ack task tries to
    ack, through that detached transport, and ``AttributeError: 'NoneType' object has no
    attribute 'hostname'`` (or ``'client'``) escapes as an "Unrecoverable error": the worker
    stops instead of reconnecting (reproduced by tests/tasks/test_faults.py: Redis down while a
    layer builds). Raising Redis' ConnectionError there instead lets kombu and Celery treat it
    as the connection error it is (logged, message left to the visibility-timeout sweep).
    """
    from kombu.transport import redis as kredis

    original = kredis.Channel._connparams
    if getattr(original, "_blobchain_hardened", False):
        return

    def _connparams(self: Any, asynchronous: bool = False) -> Any:
        transport = self.connection
        if transport is None or getattr(transport, "client", None) is None:
            raise kredis.get_redis_ConnectionError()(
                "the broker connection of this channel is already closed"
            )
        return original(self, asynchronous)

    _connparams._blobchain_hardened = True  # type: ignore[attr-defined]  # a marker on the function
    kredis.Channel._connparams = _connparams  # type: ignore[method-assign]  # the patch, see above


@worker_init.connect(weak=False)
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    if getattr(getattr(sender, "app", None), "blobchain_settings", None) is not None:
        harden_kombu()


_app: Celery | None = None
_app_lock = threading.Lock()


def _env_app() -> Celery:
    global _app
    with _app_lock:
        if _app is None:
            settings = load_settings()
            if not settings.distributed:
                raise RuntimeError(
                    "BLOBCHAIN_BROKER_URL is not set: the Celery app needs the distributed-mode "
                    "settings (BLOBCHAIN_BROKER_URL, BLOBCHAIN_S3_ENDPOINT, ...)"
                )
            _app = make_app(settings)
            _app.set_current()
        return _app


def __getattr__(name: str) -> Any:
    # ``celery -A blobchain.tasks.app`` looks up ``app`` (then ``celery``) on this module.
    if name in ("app", "celery"):
        return _env_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
