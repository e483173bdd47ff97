"""``blobchain worker``: a Celery worker for blobchain's queue, set up for graceful stops.

- Pool: prefork (a Python-heavy layer walk uses a whole core; time limits need prefork).
- ``-E``: task events for Flower and ``task_send_sent_event`` watchers.
- ``--without-mingle --without-gossip``: blobchain needs no start-up sync of revoked ids nor
  worker-to-worker gossip (work is deduplicated by claims in Redis, not by Celery), and mingle
  would add a broadcast round-trip to every start of a scaled-out fleet.
- ``REMAP_SIGTERM=SIGQUIT``: SIGTERM (what ``docker stop`` and Kubernetes send) starts the soft
  shutdown: running layers get ``worker_soft_shutdown_timeout`` seconds to finish, then the
  worker stops cold and puts their messages (late acks) back on the queue at once, so another
  worker builds them; an idle worker stops at once. Orchestrators must wait a bit longer than
  that timeout before SIGKILL (``stop_grace_period`` in compose); a SIGKILLed worker's messages
  come back only after the visibility timeout. Billiard reads ``REMAP_SIGTERM`` when it is
  imported, so if Celery was already imported without it, the worker is started in a fresh
  interpreter (``exec``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from blobchain.tasks.app import QUEUE

__all__ = ["run_worker", "worker_argv"]


def worker_argv(
    *,
    concurrency: int | None = None,
    name: str | None = None,
    queues: str = QUEUE,
    extra: Sequence[str] = (),
    loglevel: str = "INFO",
) -> list[str]:
    """The ``celery worker`` arguments (after ``celery -A blobchain.tasks.app``)."""
    argv = ["worker", "-Q", queues or QUEUE, "-P", "prefork", "-E", "--without-mingle", "--without-gossip"]
    argv += ["-l", loglevel]
    if concurrency:
        argv += ["-c", str(concurrency)]
    if name:
        argv += ["-n", name]
    return argv + list(extra)


def run_worker(
    concurrency: int | None = None,
    name: str | None = None,
    queues: str = QUEUE,
    extra: Sequence[str] = (),
) -> int:
    """Run a worker in this process until it stops; returns its exit status."""
    argv = worker_argv(concurrency=concurrency, name=name, queues=queues, extra=extra)
    os.environ.setdefault("REMAP_SIGTERM", "SIGQUIT")
    billiard_common = sys.modules.get("billiard.common")
    if (
        billiard_common is not None
        and getattr(billiard_common, "REMAP_SIGTERM", None) != os.environ["REMAP_SIGTERM"]
    ):
        # Too late for this interpreter: start the worker in a fresh one (same PID).
        os.execv(sys.executable, [sys.executable, "-m", "celery", "-A", "blobchain.tasks.app", *argv])
    from blobchain.tasks.app import _env_app

    app = _env_app()
    try:
        app.worker_main(argv=argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0
