"""Fixtures for push tests: real ``docker-registry`` instances (plain HTTP; TLS + htpasswd;
bearer tokens from a test issuer), a sample image in an OCI layout, and an environment with no
credentials of the machine's own (HOME and the auth-file variables point into the test's tmp)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import regservice


@pytest.fixture(autouse=True)
def no_host_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in (
        "REGISTRY_AUTH_FILE",
        "DOCKER_CONFIG",
        "XDG_RUNTIME_DIR",
        "XDG_CONFIG_HOME",
        "BLOBCHAIN_REGISTRY_USERNAME",
        "BLOBCHAIN_REGISTRY_PASSWORD",
    ):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture(scope="module")
def plain_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[regservice.RegistryProcess]:
    with regservice.registry(tmp_path_factory.mktemp("registry-plain")) as reg:
        yield reg


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[regservice.RegistryProcess]:
    """TLS with a certificate made here, and htpasswd (bcrypt) basic auth."""
    wd = tmp_path_factory.mktemp("registry-tls")
    tls = regservice.make_cert(wd)
    htpasswd = wd / "htpasswd"
    htpasswd.write_text(regservice.htpasswd_line(regservice.USER, regservice.PASSWORD))
    with regservice.registry(wd, tls=tls, htpasswd=htpasswd) as reg:
        yield reg


@pytest.fixture(scope="module")
def token_issuer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[regservice.TokenIssuer]:
    issuer = regservice.TokenIssuer(tmp_path_factory.mktemp("token-issuer"))
    try:
        yield issuer
    finally:
        issuer.close()


@pytest.fixture(scope="module")
def token_registry(
    tmp_path_factory: pytest.TempPathFactory, token_issuer: regservice.TokenIssuer
) -> Iterator[regservice.RegistryProcess]:
    with regservice.registry(tmp_path_factory.mktemp("registry-token"), token=token_issuer) as reg:
        yield reg


@pytest.fixture
def layout(tmp_path: Path) -> tuple[str, str]:
    return regservice.export_layout(tmp_path)
