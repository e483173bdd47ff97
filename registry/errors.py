"""Registry errors: one named class per distribution-spec error code, classed by what to do.

A registry answers a failed request with ``{"errors": [{"code": "BLOB_UNKNOWN", ...}]}``;
:func:`from_response` turns the first entry into the class registered for its code (carrying
``registry_code``, the HTTP status and the registry's message), so callers and exit codes see
the usual blobchain action classes: fix the input (InvalidArgument), not found (NotFound), not
allowed (FailedPrecondition), try again later (Unavailable). Only ``retryable`` ones are retried.

Messages never carry credentials, tokens or the upload-state query of a URL (see :func:`safe_url`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from blobchain.layers.errors import (
    BlobchainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    register,
)

__all__ = [
    "BlobUnknown",
    "BlobUploadInvalid",
    "BlobUploadUnknown",
    "Denied",
    "DigestInvalid",
    "InvalidReference",
    "ManifestBlobUnknown",
    "ManifestInvalid",
    "ManifestUnknown",
    "NameInvalid",
    "NameUnknown",
    "RegistryError",
    "RegistryProtocolError",
    "RegistryTLSError",
    "RegistryUnavailable",
    "SizeInvalid",
    "TooManyRequests",
    "Unauthorized",
    "Unsupported",
    "from_response",
    "redact",
    "safe_url",
]

_MESSAGE = 300  # a registry's own message is cut to this many characters


@register
class RegistryError(BlobchainError):
    """Mixin-style base: every registry error has ``registry_code`` and ``status``."""

    code = "registry_error"
    registry_code = "UNKNOWN"
    status: int | None = None

    def __init__(self, message: str, *, status: int | None = None, **details: Any) -> None:
        super().__init__(message, registry_code=self.registry_code, status=status, **details)
        self.status = status


# The distribution spec's error codes (and TOOMANYREQUESTS, the Docker registry's).


@register
class BlobUnknown(RegistryError, NotFound):
    """The registry does not have this blob."""

    code = "registry_blob_unknown"
    registry_code = "BLOB_UNKNOWN"


@register
class BlobUploadInvalid(RegistryError, InvalidArgument):
    """The upload session is invalid (or was cancelled)."""

    code = "registry_blob_upload_invalid"
    registry_code = "BLOB_UPLOAD_INVALID"


@register
class BlobUploadUnknown(RegistryError, NotFound):
    """The upload session is unknown (expired or cancelled)."""

    code = "registry_blob_upload_unknown"
    registry_code = "BLOB_UPLOAD_UNKNOWN"


@register
class DigestInvalid(RegistryError, InvalidArgument):
    """The uploaded bytes do not match the digest."""

    code = "registry_digest_invalid"
    registry_code = "DIGEST_INVALID"


@register
class ManifestBlobUnknown(RegistryError, NotFound):
    """A blob the manifest references is missing."""

    code = "registry_manifest_blob_unknown"
    registry_code = "MANIFEST_BLOB_UNKNOWN"


@register
class ManifestInvalid(RegistryError, InvalidArgument):
    """The registry rejected the manifest."""

    code = "registry_manifest_invalid"
    registry_code = "MANIFEST_INVALID"


@register
class ManifestUnknown(RegistryError, NotFound):
    """No such manifest."""

    code = "registry_manifest_unknown"
    registry_code = "MANIFEST_UNKNOWN"


@register
class NameInvalid(RegistryError, InvalidArgument):
    """Invalid repository name."""

    code = "registry_name_invalid"
    registry_code = "NAME_INVALID"


@register
class NameUnknown(RegistryError, NotFound):
    """The repository is not known to the registry."""

    code = "registry_name_unknown"
    registry_code = "NAME_UNKNOWN"


@register
class SizeInvalid(RegistryError, InvalidArgument):
    """The content length does not match."""

    code = "registry_size_invalid"
    registry_code = "SIZE_INVALID"


@register
class Unauthorized(RegistryError, FailedPrecondition):
    """Authentication required, or the credentials were rejected."""

    code = "registry_unauthorized"
    registry_code = "UNAUTHORIZED"


@register
class Denied(RegistryError, FailedPrecondition):
    """The credentials are valid but not allowed this."""

    code = "registry_denied"
    registry_code = "DENIED"


@register
class Unsupported(RegistryError, InvalidArgument):
    """The registry does not support the operation."""

    code = "registry_unsupported"
    registry_code = "UNSUPPORTED"


@register
class TooManyRequests(RegistryError, Unavailable):
    """The registry is rate limiting; retried with backoff."""

    code = "registry_toomanyrequests"
    registry_code = "TOOMANYREQUESTS"
    retryable = True


@register
class RegistryUnavailable(RegistryError, Unavailable):
    """The registry could not be reached or failed (connection error, 5xx); retried."""

    code = "registry_unavailable"
    registry_code = "UNAVAILABLE"
    retryable = True


@register
class RegistryTLSError(RegistryError, FailedPrecondition):
    """The registry's certificate is not trusted (or TLS failed); not retried."""

    code = "registry_tls"
    registry_code = "TLS"


@register
class InvalidReference(RegistryError, InvalidArgument):
    """An image reference could not be parsed."""

    code = "registry_reference_invalid"
    registry_code = "REFERENCE_INVALID"


@register
class RegistryProtocolError(RegistryError, FailedPrecondition):
    """An answer the distribution spec does not allow here."""

    code = "registry_unknown"
    registry_code = "UNKNOWN"


_BY_CODE: dict[str, type[RegistryError]] = {
    c.registry_code: c
    for c in (
        BlobUnknown,
        BlobUploadInvalid,
        BlobUploadUnknown,
        DigestInvalid,
        ManifestBlobUnknown,
        ManifestInvalid,
        ManifestUnknown,
        NameInvalid,
        NameUnknown,
        SizeInvalid,
        Unauthorized,
        Denied,
        Unsupported,
        TooManyRequests,
    )
}


def safe_url(url: str) -> str:
    """``url`` without userinfo, query or fragment (upload ``_state`` tokens, credentials)."""
    parts = urlsplit(str(url))
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret in ``secrets`` masked (a registry may echo what it was sent)."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def from_response(status: int, body: bytes, what: str, url: str) -> RegistryError:
    """The named error for a failed registry response."""
    code, message = "", ""
    try:
        errors = json.loads(body or b"{}").get("errors") or []
        if errors and isinstance(errors[0], dict):
            code = str(errors[0].get("code") or "")
            message = str(errors[0].get("message") or "")
    except (ValueError, AttributeError):
        pass
    if not code:
        code = {401: "UNAUTHORIZED", 403: "DENIED", 429: "TOOMANYREQUESTS"}.get(status, "")
    cls = _BY_CODE.get(code)
    if cls is None:
        cls = RegistryUnavailable if status >= 500 else RegistryProtocolError
    # The registry's words go into a one-line message on a terminal: printable and short.
    message = "".join(c if c.isprintable() else " " for c in message)
    if len(message) > _MESSAGE:
        message = message[:_MESSAGE] + "..."
    code = "".join(c for c in code if c.isprintable())[:64]
    detail = f": {message}" if message else ""
    return cls(
        f"{what}: registry answered {status} {code or 'without an error code'}{detail} ({safe_url(url)})",
        status=status,
    )
