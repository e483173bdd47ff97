import logging

import pytest

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
