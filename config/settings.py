"""One settings object, read once: environment variables ``BLOBCHAIN_*`` over an optional TOML
file (``BLOBCHAIN_CONFIG`` or ``load_settings(file=...)``). Secrets are ``SecretStr``: they never
appear in reprs or logs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

# The checks that need no model live in config/defaults (the CLI's start-up imports no pydantic).
from blobchain.config.defaults import MAX_JOBS, check_jobs, check_redis_url, default_store, redact_url
from blobchain.layers.errors import InvalidSetting

__all__ = ["MAX_JOBS", "Settings", "check_jobs", "check_redis_url", "load_settings", "redact_url"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BLOBCHAIN_", extra="ignore", frozen=True)

    # --- embedded mode ---
    store: str = Field(
        default_factory=default_store, description="OCI layout used as the local content store"
    )
    # Snapshot paths must resolve inside one of these (os.pathsep-separated in the env); empty = any.
    roots: Annotated[tuple[str, ...], NoDecode] = ()
    jobs: int | None = Field(
        default=None, ge=1, le=MAX_JOBS, description="layers built in parallel (default: all cores)"
    )
    threads: int | None = Field(default=None, ge=1, le=MAX_JOBS, description="compression threads per layer")
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

    @field_validator("broker_url", "result_url", "lock_url", mode="after")
    @classmethod
    def _check_redis_url(cls, v: SecretStr | None, info: Any) -> SecretStr | None:
        if v is not None:
            try:
                check_redis_url(v.get_secret_value(), f"BLOBCHAIN_{info.field_name.upper()}")
            except InvalidSetting as e:
                raise ValueError(e.message) from None
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
    """Settings from the environment (and ``BLOBCHAIN_CONFIG``), overridden by keyword args.

    A bad value is an InvalidSetting naming the setting (never echoing a secret's value)."""
    try:
        return Settings(**overrides)
    except ValidationError as e:
        raise settings_error(e, overrides) from None
    except (OSError, ValueError) as e:  # the BLOBCHAIN_CONFIG file: unreadable or not TOML
        where = os.environ.get("BLOBCHAIN_CONFIG", "")
        raise InvalidSetting(
            f"BLOBCHAIN_CONFIG={where}: cannot read it as TOML ({e})", setting="BLOBCHAIN_CONFIG"
        ) from None


def settings_error(e: ValidationError, overrides: dict[str, Any] | None = None) -> InvalidSetting:
    problems = []
    for err in e.errors(include_url=False, include_input=False):
        field = ".".join(str(p) for p in err.get("loc", ())) or "settings"
        name = field if overrides and field in overrides else f"BLOBCHAIN_{field.upper()}"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        problems.append(msg if msg.startswith(name) else f"{name}: {msg}")
    first = problems[0] if problems else "invalid settings"
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return InvalidSetting(f"invalid setting {first}{more}", settings=problems)
