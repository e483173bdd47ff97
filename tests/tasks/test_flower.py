"""Flower, started as a process against ``blobchain.tasks.app``, lists our workers and tasks
through its API, behind basic auth."""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsgen
import pytest
import services

from blobchain.client.api import Client
from blobchain.config.settings import Settings
from blobchain.tasks.app import make_app
from blobchain.tasks.layer_tasks import BUILD_TASK, FINALIZE_TASK, PROGRESS

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


@contextlib.contextmanager
def flower(settings: Settings, tmp_path: Path) -> Iterator[str]:
    """A Flower process on ``blobchain.tasks.app`` with basic auth; yields its base URL."""
    port = services.free_port()
    log = open(tmp_path / "flower.log", "wb")
    argv = [sys.executable, "-m", "celery", "-A", "blobchain.tasks.app", "flower"]
    argv += ["--address=127.0.0.1", f"--port={port}"]
    proc = subprocess.Popen(
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
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _online(base: str) -> dict[str, bool]:
    code, body = _get(f"{base}/api/workers?status=1")
    return body if code == 200 and isinstance(body, dict) else {}


def test_flower_lists_workers_and_tasks(
    settings: Settings, snapdir: Path, workers: Any, tmp_path: Path
) -> None:
    with flower(settings, tmp_path) as base:
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


def test_flower_under_churn_shows_workers_going_offline_and_online_and_the_takeover(
    make_settings: Any, snapdir: Path, workers: Any, tmp_path: Path
) -> None:
    # Hour-long limits (the broker would bring a dead worker's message back only after > 1 h),
    # a short lease and poll so that the takeover comes within seconds.
    settings = make_settings(lease_ttl_s=3.0, takeover_poll_s=1.0, soft_time_limit_s=3300, time_limit_s=3600)
    from .test_faults import _big_chain, _meta, _submit

    app = make_app(settings)
    chain = _big_chain(snapdir, 64 << 20)
    with flower(settings, tmp_path) as base:
        pool = [workers(settings, "churn0", concurrency=1), workers(settings, "churn1", concurrency=1)]
        for w in pool:
            w.wait_ready(app)
        _until(lambda: all(_online(base).get(w.nodename) for w in pool), 60, "both workers online in Flower")
        with Client(settings) as client:
            job, lease_cm = _submit(client, chain, compression="gzip", level=9)
            tid = job.task_ids[job.ref_id]
            holder: list[Any] = []

            def building() -> bool:
                meta = _meta(app, tid)
                if meta.get("status") == PROGRESS:
                    holder[:] = [w for w in pool if int(meta["result"].get("pid", -1)) in w.pids()]
                return bool(holder)

            _until(building, 120, "the big layer to be building")
            dead = holder[0]
            dead.kill()
            # Flower sees the killed worker go offline (its heartbeats stop) ...
            _until(lambda: _online(base).get(dead.nodename) is False, 60, "the killed worker offline in Flower")
            # ... and a restarted one come online, while the survivor stays online.
            fresh = workers(settings, "churn2", concurrency=1)
            fresh.wait_ready(app)
            _until(lambda: _online(base).get(fresh.nodename) is True, 60, "the new worker online in Flower")
            survivor = next(w for w in pool if w is not dead)
            assert _online(base).get(survivor.nodename) is True
            result = job.wait(300)
            lease_cm.__exit__(None, None, None)

        def final_states() -> Any:
            code, body = _get(f"{base}/api/tasks?limit=100")
            if code != 200:
                return None
            build = body.get(tid)
            fin = body.get(job.task_ids["finalize"])
            if build and fin and build.get("state") == "SUCCESS" and fin.get("state") == "SUCCESS":
                return build, fin
            return None

        build, fin = _until(final_states, 60, "the tasks' final states in Flower")
        # The taken-over task carries its reason (the kwargs of its last delivery) and ran on a
        # live worker.
        assert "taken over from" in str(build.get("kwargs")) and dead.nodename in str(build.get("kwargs"))
        assert build["worker"] in (survivor.nodename, fresh.nodename)
        assert result.ref_id in fin["args"]
        assert _online(base).get(dead.nodename) is False
