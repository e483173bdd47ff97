"""compose/docker-compose.yml: valid for docker-compose, and shaped as the README promises."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import services
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose" / "docker-compose.yml"
ENV_EXAMPLE = ROOT / "compose" / ".env.example"
DOCKERFILE = ROOT / "compose" / "Dockerfile"


def _env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k] = v
    return out


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _docker_compose() -> list[str]:
    return [services.require_tool("docker-compose", "docker-compose")]


def test_docker_compose_config_accepts_the_file() -> None:
    cmd = _docker_compose()
    # `config` only parses and interpolates: no Docker engine needed.
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("BLOBCHAIN_", "REDIS_", "MINIO_", "FLOWER_"))
    }
    r = subprocess.run(
        [*cmd, "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "config", "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr


def test_docker_compose_refuses_missing_secrets(tmp_path: Path) -> None:
    cmd = _docker_compose()
    empty = tmp_path / "empty.env"
    empty.write_text("")
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("BLOBCHAIN_", "REDIS_", "MINIO_", "FLOWER_"))
    }
    r = subprocess.run(
        [*cmd, "-f", str(COMPOSE), "--env-file", str(empty), "config", "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode != 0
    assert "REDIS_PASSWORD" in r.stderr or "MINIO_ROOT" in r.stderr or "FLOWER_BASIC_AUTH" in r.stderr


def _command(svc: dict[str, Any]) -> str:
    cmd = svc.get("command") or svc.get("entrypoint") or ""
    return " ".join(cmd) if isinstance(cmd, list) else str(cmd)


def test_redis_is_persistent_without_eviction(spec: dict[str, Any]) -> None:
    redis = spec["services"]["redis"]
    cmd = _command(redis)
    assert "--appendonly yes" in cmd
    assert "--maxmemory-policy noeviction" in cmd
    assert "--requirepass" in cmd and "REDIS_PASSWORD" in cmd
    assert "healthcheck" in redis
    assert any(str(v).endswith(":/data") for v in redis["volumes"])


def test_minio_is_pinned_and_a_job_creates_the_bucket(spec: dict[str, Any]) -> None:
    services = spec["services"]
    minio = services["minio"]
    image = minio["image"]
    assert image.startswith("minio/minio:RELEASE.") and not image.endswith(":latest")
    assert set(minio["environment"]) >= {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}
    assert "${" in minio["environment"]["MINIO_ROOT_PASSWORD"]  # from the env, never inline
    assert "healthcheck" in minio
    jobs = [s for s in services.values() if "mc mb" in _command(s)]
    assert len(jobs) == 1
    job = jobs[0]
    assert job["depends_on"]["minio"]["condition"] == "service_healthy"
    assert job.get("restart") == "no"


def test_worker_is_scalable_and_sees_the_snapshots_read_only(spec: dict[str, Any]) -> None:
    worker = spec["services"]["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    assert "blobchain worker" in _command(worker)
    assert worker["build"]["dockerfile"] == "compose/Dockerfile"
    build = worker["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE.resolve()
    mounts = [v for v in worker["volumes"] if isinstance(v, dict)]
    snap = [m for m in mounts if "BLOBCHAIN_SNAPSHOTS" in str(m["source"])]
    assert len(snap) == 1
    assert snap[0]["source"] == snap[0]["target"]  # same path as the submitting host
    assert snap[0]["read_only"] is True
    env = worker["environment"]
    assert env["REMAP_SIGTERM"] == "SIGQUIT"
    for key in (
        "BLOBCHAIN_BROKER_URL",
        "BLOBCHAIN_S3_ENDPOINT",
        "BLOBCHAIN_ROOTS",
        "BLOBCHAIN_S3_SECRET_KEY",
    ):
        assert key in env
    assert env["BLOBCHAIN_S3_SECRET_KEY"].startswith("${")
    # Soft shutdown (30 s) must fit in the grace period, else the stop is a SIGKILL.
    grace = worker["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) > 30
    assert "healthcheck" in worker
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["depends_on"]["createbucket"]["condition"] == "service_completed_successfully"


def test_soft_shutdown_fits_the_grace_period(spec: dict[str, Any]) -> None:
    from blobchain.tasks.app import SOFT_SHUTDOWN_S

    grace = int(spec["services"]["worker"]["stop_grace_period"][:-1])
    assert grace > SOFT_SHUTDOWN_S


def test_flower_uses_the_app_and_basic_auth(spec: dict[str, Any]) -> None:
    flower = spec["services"]["flower"]
    cmd = _command(flower)
    assert "-A blobchain.tasks.app flower" in cmd
    assert "FLOWER_BASIC_AUTH" in flower["environment"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"].startswith("${")
    assert "healthcheck" in flower
    assert all(str(p).startswith("127.0.0.1:") for p in flower["ports"])


def test_every_long_running_service_has_a_healthcheck(spec: dict[str, Any]) -> None:
    for name, svc in spec["services"].items():
        if svc.get("restart") == "no":
            continue
        assert "healthcheck" in svc, name


def test_env_example_sets_every_required_variable() -> None:
    env = _env_example()
    text = COMPOSE.read_text()
    for var in (
        "REDIS_PASSWORD",
        "MINIO_ROOT_USER",
        "MINIO_ROOT_PASSWORD",
        "FLOWER_BASIC_AUTH",
        "BLOBCHAIN_SNAPSHOTS",
    ):
        assert f"${{{var}:?" in text, var
        assert env.get(var), var


def test_dockerfile_installs_blobchain_from_the_repo() -> None:
    text = DOCKERFILE.read_text()
    assert "pip install /src" in text
    assert "REMAP_SIGTERM=SIGQUIT" in text
