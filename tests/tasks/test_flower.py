"""Flower, started as a process against ``blobchain.tasks.app``, lists our workers and tasks
through its API, behind basic auth."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import fsgen
import pytest
import services

from blobchain.config.settings import Settings
from blobchain.tasks.app import make_app
from blobchain.tasks.layer_tasks import BUILD_TASK, FINALIZE_TASK

from .conftest import clean_env, run_chain

pytestmark = [pytest.mark.integration, pytest.mark.slow]

AUTH = "ci:flower-test-pass"


def _get(url: str, auth: str | None = AUTH) -> tuple[int, Any]:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
            return r.status, json.loads(body) if body[:1] in (b"{", b"[") else body.decode()
    except urllib.error.HTTPError as e:
        return e.code, None


def _until(fn: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except (OSError, urllib.error.URLError):
            last = None
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def test_flower_lists_workers_and_tasks(
    settings: Settings, snapdir: Path, workers: Any, tmp_path: Path
) -> None:
    port = services.free_port()
    log = open(tmp_path / "flower.log", "wb")
    argv = [sys.executable, "-m", "celery", "-A", "blobchain.tasks.app", "flower"]
    argv += ["--address=127.0.0.1", f"--port={port}"]
    flower = subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        # Basic auth from the environment, as compose/docker-compose.yml passes it.
        env=clean_env(settings, FLOWER_BASIC_AUTH=AUTH),
        start_new_session=True,
    )
    log.close()
    base = f"http://127.0.0.1:{port}"
    try:
        _until(lambda: _get(f"{base}/healthcheck", auth=None) == (200, "OK"), 60, "flower to start")
        w = workers(settings, "flowered")
        w.wait_ready(make_app(settings))
        _, listed = _until(
            lambda: (lambda r: r if r[0] == 200 and r[1].get(w.nodename) is True else None)(
                _get(f"{base}/api/workers?status=1")
            ),
            60,
            "the worker in /api/workers",
        )
        assert listed[w.nodename] is True

        def tasks(ref_id: str) -> Any:
            code, body = _get(f"{base}/api/tasks?limit=50")
            if code != 200:
                return None
            done = {t["name"]: t for t in body.values() if t.get("state") == "SUCCESS"}
            if {BUILD_TASK, FINALIZE_TASK} <= set(done) and ref_id in done[FINALIZE_TASK]["args"]:
                return done
            return None

        # Flower's event receiver may subscribe after its healthcheck answers; events sent before
        # are lost, so a chain that went unseen is followed by another.
        for attempt in range(3):
            snap = fsgen.build(snapdir / f"s{attempt}", {b"f": fsgen.File(b"watched %d" % attempt)})
            result = run_chain(settings, [snap])
            try:
                done = _until(
                    lambda r=result.ref_id: tasks(r), 20 if attempt < 2 else 60, "our tasks in /api/tasks"
                )
                break
            except AssertionError:
                if attempt == 2:
                    raise
        assert done[BUILD_TASK]["worker"] == w.nodename
        # The API refuses requests without (or with wrong) credentials.
        assert _get(f"{base}/api/workers", auth=None)[0] == 401
        assert _get(f"{base}/api/tasks", auth="ci:wrong")[0] == 401
    finally:
        flower.send_signal(signal.SIGTERM)
        try:
            flower.wait(15)
        except subprocess.TimeoutExpired:
            flower.kill()
            flower.wait(10)
