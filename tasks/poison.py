"""Poison refs: a ref whose build keeps killing its worker (SIGKILL, OOM, segfault: the message
comes back each time) fails with :class:`PoisonRef` once it crashed ``max_attempts`` times.

Each execution of a build counts as a start of its (ref, variant) in Redis (``poison.lua``); a
normal exit (success or a handled error) takes the start back, a crash leaves it. The count
outlives the retries of every message carrying the ref. (Celery 5.7's
``task_retry_on_worker_lost`` is not used: it shares ``max_retries`` with our waiting retries,
waits ``default_retry_delay`` and does nothing when the whole worker dies; this counter covers a
dead pool child and a dead worker alike.)
"""

from __future__ import annotations

import logging
from importlib.resources import files
from typing import Any

import redis

from blobchain.layers.errors import BlobchainError, FailedPrecondition, register
from blobchain.storage.redis_util import redis_errors

__all__ = ["ATTEMPTS_TTL_S", "Attempt", "PoisonRef", "attempts_key"]

log = logging.getLogger(__name__)

# The crash history of a ref outlives the retries of every message carrying it.
ATTEMPTS_TTL_S = 6 * 3600
_SCRIPT = files(__package__).joinpath("poison.lua").read_text()


@register
class PoisonRef(FailedPrecondition):
    """A ref killed its worker too many times; it is failed instead of retried forever."""

    code = "poison_ref"


def attempts_key(prefix: str, flight: str) -> str:
    return f"{prefix}attempts:{flight}"


class Attempt:
    """This execution, counted as a start of ``flight``'s build (see the module doc)."""

    def __init__(self, client: redis.Redis, prefix: str, flight: str, task_id: str) -> None:
        self._client = client
        self._script: Any = client.register_script(_SCRIPT)
        self.key = attempts_key(prefix, flight)
        self.task_id = task_id

    def start(self) -> tuple[int, int]:
        """(this start's number, crashes seen on the ref). Unavailable if Redis is down."""
        with redis_errors(self._client, f"count attempts of {self.key}"):
            n, crashes = self._script(keys=[self.key], args=["start", self.task_id, ATTEMPTS_TTL_S * 1000])
        return int(n), int(crashes)

    def finish(self, *, success: bool) -> None:
        """Take this start back (``success``: forget the ref's crash history)."""
        try:
            with redis_errors(self._client, f"finish attempt {self.key}"):
                if success:
                    self._client.delete(self.key)
                else:
                    self._script(keys=[self.key], args=["finish", self.task_id])
        except BlobchainError as e:  # leaves a start counted: errs towards PoisonRef, never a loop
            log.warning("could not update attempt count %s: %s", self.key, e)
