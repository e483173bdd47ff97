"""The settings when nothing is configured, without importing pydantic (start-up of the CLI).

:func:`quick_settings` is what the CLI reads: when no ``BLOBCHAIN_*`` variable is set (so no
``BLOBCHAIN_CONFIG`` file either) the :class:`Settings` model would hold its defaults, and these
are the same values as a plain :class:`Defaults`; otherwise it is ``load_settings()``, parsed and
validated by pydantic-settings as always. Importing pydantic and pydantic-settings costs ~70 ms,
a quarter of a tiny export (bench/run_startup.py). ``tests/config`` checks every field against
the model, so the two cannot drift apart.

Also the checks that need no model: job counts, Redis URLs, redaction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeAlias
from urllib.parse import urlsplit, urlunsplit

from blobchain.layers.errors import InvalidSetting

if TYPE_CHECKING:
    from blobchain.config.settings import Settings

__all__ = [
    "MAX_JOBS",
    "AnySettings",
    "Defaults",
    "check_jobs",
    "check_redis_url",
    "default_store",
    "quick_settings",
    "redact_url",
]

# More builds at once than this is a typo, not a machine: each is a process.
MAX_JOBS = 1024
_REDIS_SCHEMES = ("redis", "rediss")
_ENV_PREFIX = "BLOBCHAIN_"


def default_store() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "blobchain", "store")


def redact_url(url: str) -> str:
    """``url`` with any password replaced, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def check_jobs(jobs: int | None, name: str = "jobs") -> int | None:
    """``jobs`` if None or 1..MAX_JOBS, else InvalidSetting."""
    if jobs is None:
        return None
    if isinstance(jobs, bool) or not isinstance(jobs, int) or not 1 <= jobs <= MAX_JOBS:
        raise InvalidSetting(f"{name} must be an integer in 1..{MAX_JOBS}, got {jobs!r}", setting=name)
    return jobs


def check_redis_url(url: str, name: str = "broker_url") -> str:
    """``url`` if it is a usable Redis URL (redis:// or rediss://, a host, a valid port and
    database), else InvalidSetting. The message never shows the password."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a bad or out-of-range port
        host = parts.hostname
        shown = redact_url(url)
    except ValueError as e:
        raise InvalidSetting(f"{name}: not a valid URL ({e})", setting=name) from None
    if parts.scheme not in _REDIS_SCHEMES:
        raise InvalidSetting(
            f"{name}={shown}: scheme must be redis:// or rediss://, not {parts.scheme + '://' if parts.scheme else 'none'}",
            setting=name,
        )
    if not host:
        raise InvalidSetting(f"{name}={shown}: no host", setting=name)
    if port == 0:
        raise InvalidSetting(f"{name}={shown}: port 0", setting=name)
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise InvalidSetting(f"{name}={shown}: database {db!r} is not a number", setting=name)
    return url


@dataclass(frozen=True)
class Defaults:
    """:class:`Settings` as it is when nothing is configured: the same fields, the same values
    (embedded mode: no broker, no secrets). Read like the model; ``model_copy(update=...)``
    returns a changed copy, unvalidated, as pydantic's does."""

    # --- embedded mode ---
    store: str = field(default_factory=default_store)
    roots: tuple[str, ...] = ()
    jobs: int | None = None
    threads: int | None = None
    compression: str = "gzip"
    level: int | None = None
    lease_ttl_s: float = 60.0

    # --- distributed mode: never configured here ---
    broker_url: None = None
    result_url: None = None
    lock_url: None = None
    redis_tls_ca: str | None = None
    key_prefix: str = "blobchain:"
    s3_endpoint: str | None = None
    s3_region: str = "us-east-1"
    s3_bucket: str = "blobchain"
    s3_prefix: str = ""
    s3_access_key: None = None
    s3_secret_key: None = None
    s3_verify_tls: bool = True
    s3_ca_bundle: str | None = None
    soft_time_limit_s: int = 3300
    time_limit_s: int = 3600
    max_attempts: int = 3
    wait_budget_s: float = 3600.0
    takeover_poll_s: float = 10.0

    @property
    def distributed(self) -> bool:
        return False

    def secret(self, name: str) -> str | None:
        getattr(self, name)  # an unknown name fails as on the model
        return None

    def redis_urls(self) -> tuple[str, str, str]:
        raise ValueError("BLOBCHAIN_BROKER_URL is not set")

    def model_copy(self, *, update: dict[str, Any] | None = None) -> Defaults:
        return replace(self, **(update or {}))


# What the client, the factory and the CLI accept: the model, or its defaults read without it.
AnySettings: TypeAlias = "Settings | Defaults"


def quick_settings(**overrides: Any) -> AnySettings:
    """``load_settings(**overrides)``, without importing pydantic when that cannot change the
    answer: no ``BLOBCHAIN_*`` variable in the environment (matched in any case, as
    pydantic-settings does) and at most a ``store`` path as override."""
    configured = any(k.upper().startswith(_ENV_PREFIX) for k in os.environ)
    plain = set(overrides) <= {"store"} and all(isinstance(v, str) for v in overrides.values())
    if configured or not plain:
        from blobchain.config.settings import load_settings

        return load_settings(**overrides)
    return Defaults(**overrides)
