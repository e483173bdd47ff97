"""The takeover janitor: a thread in every worker's main process that sends a dead holder's work
again as soon as its claim expires, instead of waiting for the broker's visibility timeout.

Every build holds a tracked claim (``storage.claims.redis``): the claim carries its task's message.
A holder that dies (``kill -9`` of the whole worker, a lost machine) or is cut off stops
refreshing; its claim expires ``lease_ttl_s`` after the last refresh and its delivery becomes
due. Each janitor also beats for its worker (``<prefix>worker:<node>``, 3 polls long): a due
delivery whose worker beat after the claim expired lost only its pool process, and that worker
puts the message back itself (``task_reject_on_worker_lost``), so it is not sent twice. Each
janitor takes due deliveries of gone workers every ``takeover_poll_s`` (one atomic script: a
delivery goes to one janitor) and publishes the same task again: same task id, same chord, so the chain's
final step counts it once; ``takeover`` in its kwargs says why (it shows in Flower, in the task's
progress and result, and in the client's events). A due delivery whose task already finished is
dropped. The new delivery goes through the normal path: the claim (only one worker diffs the
ref), the fenced commit (a cut-off holder that comes back cannot commit over it) and the crash
counter (a ref that kills every worker still ends as ``PoisonRef`` after ``max_attempts``).

Worst case from a holder's death to the new delivery being on the queue: ``lease_ttl_s`` (the
last refresh was at most ``lease_ttl_s / 3`` before) plus one poll (``takeover_poll_s``, jittered
by +/-25 %). With the defaults (60 s, 10 s) that is at most about 73 s, whatever the time limits.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from typing import Any

from celery import Celery, states

from blobchain.config.settings import Settings
from blobchain.layers.errors import BlobchainError
from blobchain.storage.claims.redis import RedisClaimService

__all__ = ["Janitor", "takeover_reason"]

log = logging.getLogger(__name__)

_STATS_TTL_S = 30 * 86400


def takeover_reason(delivery: dict[str, Any], by: str) -> str:
    since = delivery.get("since")
    ran = f", after running {time.time() - since:.0f} s" if isinstance(since, (int, float)) else ""
    return (
        f"taken over from {delivery.get('host') or '?'} (pid {delivery.get('pid', '?')}): its lease on "
        f"{delivery.get('flight') or delivery.get('key')} expired without a release (worker died or cut off"
        f"{ran}); sent again by {by}"
    )


class Janitor:
    """Takes due deliveries and sends them again (see the module docstring)."""

    def __init__(
        self, app: Celery, settings: Settings, claims: RedisClaimService, hostname: str | None = None
    ) -> None:
        self.app = app
        self.settings = settings
        self.claims = claims
        self.hostname = hostname or socket.gethostname()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> list[str]:
        """One pass: returns the task ids sent again."""
        sent: list[str] = []
        poll = max(self.settings.takeover_poll_s, 0.2)
        self.claims.beat(self.hostname, max(2.0, 3 * poll))
        for due in self.claims.take_due(hold_s=self.settings.lease_ttl_s, recheck_s=poll):
            d = due.delivery
            task_id = str(d.get("task_id") or "")
            message = d.get("message")
            if not task_id or not isinstance(message, dict):
                self.claims.forget(due.token)
                continue
            try:
                state = self.app.backend.get_task_meta(task_id).get("status", states.PENDING)
            except Exception as e:  # result backend unreachable: the claim expires, we try again
                log.warning("takeover of task %s postponed: result backend: %s", task_id, e)
                continue
            if state in states.READY_STATES:
                self.claims.forget(due.token)  # the task finished after all (its retry, a duplicate)
                continue
            reason = takeover_reason(d, self.hostname)
            kwargs = dict(message.get("kwargs") or {})
            previous = kwargs.get("takeover") or {}
            kwargs["takeover"] = {
                "reason": reason,
                "from": {"host": d.get("host"), "pid": d.get("pid")},
                "count": int(previous.get("count", 0)) + 1,
                "at": time.time(),
            }
            sig = self.app.signature({**message, "kwargs": kwargs})
            sig.apply_async()
            self.claims.forget(due.token)
            self._count(str(d.get("flight") or d.get("key") or task_id))
            log.warning("ref %s (task %s): %s", d.get("ref"), task_id, reason)
            sent.append(task_id)
        return sent

    def _count(self, flight: str) -> None:
        try:
            key = f"{self.settings.key_prefix}stats:takeovers:{flight}"
            pipe = self.claims.client.pipeline(transaction=True)
            pipe.incr(key)
            pipe.expire(key, _STATS_TTL_S)
            pipe.execute()
        except Exception as e:  # a counter for operators; the takeover itself happened
            log.debug("could not count takeover of %s: %s", flight, e)

    def _run(self) -> None:
        poll = self.settings.takeover_poll_s
        while True:
            try:
                self.run_once()
            except BlobchainError as e:  # Redis down: the next pass tries again
                log.warning("takeover janitor: %s", e)
            except Exception:
                log.exception("takeover janitor pass failed")
            if self._stop.wait(poll * random.uniform(0.75, 1.25)):
                return

    def start(self) -> Janitor:
        self._thread = threading.Thread(target=self._run, name="blobchain-janitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
