import logging

from blobchain.config.settings import Settings, load_settings, redact_url


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
