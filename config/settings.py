"""One settings object, read once: environment variables ``BLOBCHAIN_*`` over an optional TOML
file (``BLOBCHAIN_CONFIG`` or ``load_settings(file=...)``). Secrets are ``SecretStr``: they never
appear in reprs or logs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

__all__ = ["Settings", "load_settings", "redact_url"]


def _default_store() -> str:
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


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BLOBCHAIN_", extra="ignore", frozen=True)

    # --- embedded mode ---
    store: str = Field(
        default_factory=_default_store, description="OCI layout used as the local content store"
    )
    # Snapshot paths must resolve inside one of these (os.pathsep-separated in the env); empty = any.
    roots: Annotated[tuple[str, ...], NoDecode] = ()
    jobs: int | None = Field(default=None, ge=1, description="layers built in parallel (default: all cores)")
    threads: int | None = Field(default=None, ge=1, description="compression threads per layer")
    compression: str = "gzip"
    level: int | None = None
    lease_ttl_s: float = Field(default=60.0, gt=0)

    # --- distributed mode (Celery + Redis + S3) ---
    broker_url: SecretStr | None = None
    result_url: SecretStr | None = None
    lock_url: SecretStr | None = None
    redis_tls_ca: str | None = None
    key_prefix: str = "blobchain:"
    s3_endpoint: str | None = None
    s3_region: str = "us-east-1"
    s3_bucket: str = "blobchain"
    s3_prefix: str = ""
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None
    s3_verify_tls: bool = True
    s3_ca_bundle: str | None = None
    soft_time_limit_s: int = Field(default=3300, gt=0)
    time_limit_s: int = Field(default=3600, gt=0)
    max_attempts: int = Field(default=3, ge=1, description="worker crashes before a ref is failed as poison")
    wait_budget_s: float = Field(
        default=3600.0, gt=0, description="how long a duplicate waits for the holder"
    )
    takeover_poll_s: float = Field(
        default=10.0, ge=0, description="how often each worker's janitor looks for expired leases (0 = off)"
    )

    @field_validator("roots", mode="before")
    @classmethod
    def _split_roots(cls, v: Any) -> Any:
        if isinstance(v, str):
            return tuple(p for p in v.split(os.pathsep) if p)
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = os.environ.get("BLOBCHAIN_CONFIG")
        if path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(path)))
        return tuple(sources)

    @property
    def distributed(self) -> bool:
        return self.broker_url is not None

    def secret(self, name: str) -> str | None:
        v = getattr(self, name)
        return v.get_secret_value() if v is not None else None

    def redis_urls(self) -> tuple[str, str, str]:
        """(broker, results, locks); results and locks default to the broker's server."""
        broker = self.secret("broker_url")
        if broker is None:
            raise ValueError("BLOBCHAIN_BROKER_URL is not set")
        return broker, self.secret("result_url") or broker, self.secret("lock_url") or broker


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment (and ``BLOBCHAIN_CONFIG``), overridden by keyword args."""
    return Settings(**overrides)
