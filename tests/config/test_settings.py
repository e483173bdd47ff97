import dataclasses
import logging
import os
import subprocess
import sys

import pytest

from blobchain.config.defaults import Defaults, quick_settings
from blobchain.config.settings import (
    MAX_JOBS,
    Settings,
    check_jobs,
    check_redis_url,
    load_settings,
    redact_url,
)
from blobchain.layers.errors import InvalidSetting


def test_embedded_by_default(monkeypatch, tmp_path):
    for k in list(__import__("os").environ):
        if k.startswith("BLOBCHAIN_"):
            monkeypatch.delenv(k)
    s = load_settings(store=str(tmp_path))
    assert not s.distributed
    assert s.roots == ()


def test_env_and_file(monkeypatch, tmp_path):
    cfg = tmp_path / "blobchain.toml"
    cfg.write_text('s3_bucket = "from-file"\ncompression = "zstd"\n')
    monkeypatch.setenv("BLOBCHAIN_CONFIG", str(cfg))
    monkeypatch.setenv("BLOBCHAIN_COMPRESSION", "uncompressed")
    monkeypatch.setenv("BLOBCHAIN_ROOTS", "/srv/snaps:/mnt/more")
    monkeypatch.setenv("BLOBCHAIN_BROKER_URL", "redis://:hunter2@redis:6379/0")
    s = load_settings()
    assert s.s3_bucket == "from-file"  # from the file
    assert s.compression == "uncompressed"  # env wins over the file
    assert s.roots == ("/srv/snaps", "/mnt/more")
    assert s.distributed
    assert s.redis_urls() == ("redis://:hunter2@redis:6379/0",) * 3


def test_secrets_never_in_repr_or_logs(caplog):
    s = Settings(
        broker_url="redis://:hunter2@redis:6379/0",
        s3_access_key="AKIAEXAMPLE",
        s3_secret_key="very-secret-key",
    )
    text = repr(s) + str(s) + str(s.model_dump())
    with caplog.at_level(logging.INFO):
        logging.getLogger("t").info("settings: %s %r", s, s)
    for secret in ("hunter2", "very-secret-key", "AKIAEXAMPLE"):
        assert secret not in text
        assert secret not in caplog.text
    assert s.secret("s3_secret_key") == "very-secret-key"


def test_redact_url():
    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("rediss://user:pw@h:1/0") == "rediss://user:***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


# --- issue 6: bad settings are named errors (InvalidSetting), never a raw ValidationError ------


@pytest.mark.parametrize("value", ["0", "-1", "abc", str(MAX_JOBS + 1)])
def test_bad_jobs_from_the_environment(monkeypatch, value):
    monkeypatch.setenv("BLOBCHAIN_JOBS", value)
    with pytest.raises(InvalidSetting, match="BLOBCHAIN_JOBS"):
        load_settings()


def test_jobs_range():
    assert check_jobs(None) is None and check_jobs(1) == 1 and check_jobs(MAX_JOBS) == MAX_JOBS
    for bad in (0, -1, MAX_JOBS + 1, True, 2.5):
        with pytest.raises(InvalidSetting):
            check_jobs(bad)  # type: ignore[arg-type]


def test_client_refuses_bad_jobs(tmp_path):
    from blobchain.client import Client

    for bad in (0, -1, 10**9):
        with pytest.raises(InvalidSetting):
            Client(Settings(store=str(tmp_path)), jobs=bad)


@pytest.mark.parametrize(
    "url",
    [
        "redis://:hunter2@h:99999/0",
        "redis://:hunter2@h:-1/0",
        "redis://:hunter2@h:abc/0",
        "http://:hunter2@h:6379/0",
        "amqp://:hunter2@h/0",
        "redis://:hunter2@[::1/0",
        "redis://:hunter2@[zz::1]:6379/0",
        "redis://:hunter2@h:6379/db",
        "redis://:hunter2@/0",
        "h:6379",
    ],
)
@pytest.mark.parametrize("name", ["BLOBCHAIN_BROKER_URL", "BLOBCHAIN_RESULT_URL", "BLOBCHAIN_LOCK_URL"])
def test_malformed_redis_urls(monkeypatch, url, name):
    monkeypatch.setenv(name, url)
    with pytest.raises(InvalidSetting) as e:
        load_settings()
    assert name in e.value.message
    assert "hunter2" not in e.value.message and "hunter2" not in str(e.value.details)


@pytest.mark.parametrize(
    "url",
    ["redis://h:6379/0", "rediss://:pw@h:6380/2", "redis://[::1]:6379", "redis://h", "redis://user:pw@h/15"],
)
def test_good_redis_urls(url):
    assert check_redis_url(url) == url
    assert Settings(broker_url=url).distributed


def test_distributed_needs_an_s3_endpoint(monkeypatch):
    from blobchain.config.factory import open_deps

    for k in list(__import__("os").environ):
        if k.startswith("BLOBCHAIN_"):
            monkeypatch.delenv(k)
    with pytest.raises(InvalidSetting, match="BLOBCHAIN_S3_ENDPOINT"):
        open_deps(Settings(broker_url="redis://h:6379/0"))


def test_a_config_file_that_is_not_toml(monkeypatch, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("jobs = [\n")
    monkeypatch.setenv("BLOBCHAIN_CONFIG", str(bad))
    with pytest.raises(InvalidSetting, match="BLOBCHAIN_CONFIG"):
        load_settings()
    bad.write_text("jobs = 0\n")
    with pytest.raises(InvalidSetting, match="BLOBCHAIN_JOBS"):
        load_settings()


# --- the defaults read without pydantic (config/defaults.py) ---------------------------------


def _clean_env(monkeypatch, tmp_path):
    for k in list(os.environ):
        if k.upper().startswith("BLOBCHAIN_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))


def test_defaults_have_every_field_of_the_model_with_its_default_value(monkeypatch, tmp_path):
    _clean_env(monkeypatch, tmp_path)
    model, plain = Settings(), Defaults()
    assert {f.name for f in dataclasses.fields(Defaults)} == set(Settings.model_fields)
    for name in Settings.model_fields:
        assert getattr(plain, name) == getattr(model, name), name
    for name in ("distributed", "key_prefix", "store"):
        assert getattr(plain, name) == getattr(model, name)
    assert plain.secret("s3_secret_key") is None is model.secret("s3_secret_key")
    with pytest.raises(ValueError, match="BLOBCHAIN_BROKER_URL"):
        plain.redis_urls()
    with pytest.raises(AttributeError):
        plain.secret("no_such_setting")
    moved = plain.model_copy(update={"store": str(tmp_path / "x")})
    assert moved.store == model.model_copy(update={"store": str(tmp_path / "x")}).store
    assert plain.store == str(tmp_path / "xdg" / "blobchain" / "store")


def test_quick_settings_uses_the_model_whenever_something_is_configured(monkeypatch, tmp_path):
    _clean_env(monkeypatch, tmp_path)
    assert isinstance(quick_settings(), Defaults)
    assert quick_settings(store="/s") == Defaults(store="/s")
    assert isinstance(quick_settings(jobs=2), Settings)  # an override to validate
    for name in ("BLOBCHAIN_JOBS", "blobchain_jobs"):  # pydantic-settings matches any case
        monkeypatch.setenv(name, "3")
        s = quick_settings(store="/s")
        assert isinstance(s, Settings) and s.jobs == 3 and s.store == "/s"
        monkeypatch.delenv(name)
    monkeypatch.setenv("BLOBCHAIN_JOBS", "0")
    with pytest.raises(InvalidSetting):
        quick_settings()  # still validated
    monkeypatch.delenv("BLOBCHAIN_JOBS")
    cfg = tmp_path / "c.toml"
    cfg.write_text('store = "/from/file"\n')
    monkeypatch.setenv("BLOBCHAIN_CONFIG", str(cfg))
    assert quick_settings().store == "/from/file"


def test_the_defaults_path_imports_no_pydantic_settings(tmp_path):
    # Importing the CLI, the client and the factory and reading the defaults: no pydantic-settings
    # (typer itself imports pydantic to coerce option values, so pydantic may be there).
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BLOBCHAIN_")}
    code = (
        "import sys, blobchain.client.cli, blobchain.config, blobchain.config.factory;"
        "from blobchain.config.defaults import quick_settings; quick_settings(store='x');"
        "print('pydantic_settings' in sys.modules, 'blobchain.config.settings' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
