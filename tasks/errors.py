"""Errors on their way through Celery's result backend, and the catalogue of every code.

Failures cross the result backend as :class:`RefFailed` (JSON-friendly: code, message, details);
the client rebuilds the same ``BlobchainError`` subclass with ``layers.errors.from_code``. Every
code a worker can send is registered by the module defining its class; importing this module
imports all of them (below), so the client knows every code whatever else it imported.
"""

from __future__ import annotations

from typing import Any

# Every module that defines (and so registers) an error class a worker may raise.
import blobchain.layers.imageconfig
import blobchain.layers.overlay
import blobchain.registry.errors
import blobchain.storage.claims
import blobchain.storage.content.s3
import blobchain.storage.leases
import blobchain.storage.redis_util
import blobchain.tasks.poison
import blobchain.workers.errors  # noqa: F401
from blobchain.layers.errors import BlobchainError, FailedPrecondition, from_code, register
from blobchain.workers.executor import error_dict

__all__ = ["RefFailed", "RefTimedOut"]


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
