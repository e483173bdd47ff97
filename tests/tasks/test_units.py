"""The adapter's pure parts: configuration, canvas shape, error transport, backoff, argv."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from celery.backends.base import BaseBackend
from celery.exceptions import TimeLimitExceeded, WorkerLostError

from blobchain.config.settings import Settings
from blobchain.layers.errors import BlobchainError, DigestMismatch, SnapshotNotFound
from blobchain.layers.records import LayerOptions
from blobchain.tasks import app as app_module
from blobchain.tasks.app import QUEUE, celery_config, harden_kombu, make_app, timing
from blobchain.tasks.canvas import chain_signature
from blobchain.tasks.layer_tasks import BUILD_TASK, FINALIZE_TASK, RefFailed, RefTimedOut
from blobchain.tasks.poison import PoisonRef
from blobchain.tasks.submit import CeleryExecutor, task_error
from blobchain.tasks.worker import worker_argv
from blobchain.workers.errors import InProgress
from blobchain.workers.retry import backoff

SETTINGS = Settings(broker_url="redis://127.0.0.1:1/0", key_prefix="unit:", s3_endpoint="http://127.0.0.1:1")


@pytest.mark.parametrize("hard", [2, 12, 60, 3600, 86400])
def test_visibility_timeout_exceeds_hard_limit_plus_longest_countdown(hard: int) -> None:
    t = timing(Settings(broker_url="redis://x/0", time_limit_s=hard, soft_time_limit_s=hard))
    assert t.soft_time_limit_s < t.time_limit_s == hard
    assert t.visibility_timeout_s > t.time_limit_s + t.max_countdown_s
    assert 1 <= t.max_countdown_s <= 30
    assert t.soft_shutdown_s <= t.soft_time_limit_s


def test_celery_config_has_the_reliability_settings() -> None:
    conf = celery_config(SETTINGS)
    t = timing(SETTINGS)
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1
    assert (conf["task_soft_time_limit"], conf["task_time_limit"]) == (3300, 3600)
    bto = conf["broker_transport_options"]
    assert bto["visibility_timeout"] == conf["visibility_timeout"] == t.visibility_timeout_s
    assert conf["result_backend_transport_options"]["visibility_timeout"] == t.visibility_timeout_s
    assert bto["global_keyprefix"] == conf["result_backend_transport_options"]["global_keyprefix"] == "unit:"
    assert bto["unacked_restore_throttle"] == 1 and bto["unacked_restore_interval"] <= 5
    assert conf["task_default_queue"] == QUEUE == "blobchain"
    assert conf["task_serializer"] == conf["result_serializer"] == "json"
    assert conf["accept_content"] == ["json"]
    for key in (
        "worker_send_task_events",
        "task_send_sent_event",
        "task_track_started",
        "broker_connection_retry_on_startup",
        "worker_cancel_long_running_tasks_on_connection_loss",
    ):
        assert conf[key] is True, key
    assert conf["worker_soft_shutdown_timeout"] > 0
    assert conf["worker_enable_soft_shutdown_on_idle"] is False  # an idle worker stops at once
    assert conf["result_chord_expires"] >= conf["result_expires"] >= 86400
    # Results and locks default to the broker's server.
    assert conf["result_backend"] == "redis://127.0.0.1:1/0"


def test_tls_urls_get_ssl_options() -> None:
    s = Settings(broker_url="rediss://h:6380/0", result_url="rediss://h:6380/1", redis_tls_ca="/ca.pem")
    conf = celery_config(s)
    assert conf["broker_use_ssl"]["ssl_ca_certs"] == "/ca.pem"
    assert conf["redis_backend_use_ssl"]["ssl_ca_certs"] == "/ca.pem"
    assert "broker_use_ssl" not in celery_config(SETTINGS)


def test_make_app_registers_the_tasks() -> None:
    app = make_app(SETTINGS)
    app.finalize()
    assert {BUILD_TASK, FINALIZE_TASK} <= set(app.tasks)
    assert app.tasks[BUILD_TASK].acks_late
    assert app.tasks[BUILD_TASK].max_retries is None  # our own budgets bound the retries
    assert app.conf.broker_url == "redis://127.0.0.1:1/0"


def test_module_app_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from celery import _state
    from celery.app.utils import find_app

    previous = _state.get_current_app()
    monkeypatch.setattr(app_module, "_app", None)
    monkeypatch.delenv("BLOBCHAIN_BROKER_URL", raising=False)
    with pytest.raises(RuntimeError, match="BLOBCHAIN_BROKER_URL"):
        _ = app_module.app
    monkeypatch.setenv("BLOBCHAIN_BROKER_URL", "redis://127.0.0.1:1/4")
    monkeypatch.setenv("BLOBCHAIN_KEY_PREFIX", "envp:")
    try:
        app = app_module.app
        assert app.conf.broker_url == "redis://127.0.0.1:1/4"
        assert app.conf.broker_transport_options["global_keyprefix"] == "envp:"
        assert find_app("blobchain.tasks.app") is app  # what `celery -A blobchain.tasks.app` does
    finally:
        app_module._app = None
        previous.set_current()


def test_chain_signature_is_one_flat_chord() -> None:
    app = make_app(SETTINGS)
    opts = LayerOptions(compression="zstd", level=5)
    sig = chain_signature(app, ["a", "b", "c"], opts, True, "c", header_ids=["1", "2", "3"], body_id="9")
    header = list(sig.tasks)
    assert [t.task for t in header] == [BUILD_TASK] * 3
    # (ref, what determines the bytes, create_if_needed, force): scheduling travels beside the options
    assert [t.args for t in header] == [(r, opts.to_dict(), True, False) for r in "abc"]
    assert all(t.immutable for t in header)
    assert all(not getattr(t, "tasks", None) for t in header)  # no nested groups
    assert [t.options["task_id"] for t in header] == ["1", "2", "3"]
    assert {t.options["queue"] for t in header} == {QUEUE}
    body = sig.body
    assert body.task == FINALIZE_TASK
    assert body.args == ("c", opts.to_dict())
    assert body.options["task_id"] == "9"
    with pytest.raises(ValueError):
        chain_signature(app, ["a", "b"], opts, True, "c")
    with pytest.raises(ValueError):
        chain_signature(app, ["a", "a"], opts, True, "a")
    with pytest.raises(ValueError):
        chain_signature(app, ["a", "b"], opts, True, "b", header_ids=["1"])


def test_ref_failed_crosses_the_json_result_backend() -> None:
    backend = BaseBackend(app=make_app(SETTINGS), serializer="json")
    err = DigestMismatch("bad bytes", expected="sha256:aa", got="sha256:bb", ref="r1")
    stored = json.loads(json.dumps(backend.prepare_exception(RefFailed.of(err))))
    back = backend.exception_to_python(stored)
    assert isinstance(back, RefFailed)
    rebuilt = back.error()
    assert type(rebuilt) is DigestMismatch
    assert (rebuilt.message, rebuilt.expected, rebuilt.got) == ("bad bytes", "sha256:aa", "sha256:bb")
    assert rebuilt.details["ref"] == "r1"
    assert str(back) == "digest_mismatch: bad bytes"


def test_task_error_maps_celery_failures_to_named_errors() -> None:
    assert (
        type(task_error(RefFailed("snapshot_not_found", "gone", {"snapshot": "/x"}), "r")) is SnapshotNotFound
    )
    assert type(task_error(TimeLimitExceeded(5), "r")) is RefTimedOut
    assert type(task_error(WorkerLostError("signal 9"), "r")) is PoisonRef
    e = InProgress("busy")
    assert task_error(e, "r") is e
    other = task_error(KeyError("boom"), "r")
    assert type(other) is BlobchainError and "KeyError" in other.message


def test_backoff_is_capped_exponential_with_jitter() -> None:
    for attempt in range(40):
        for _ in range(20):
            d = backoff(attempt, 7.0)
            assert 0 < d <= 7.0
    assert max(backoff(0, 30) for _ in range(200)) <= 0.375
    assert min(backoff(10, 30) for _ in range(200)) >= 15


def test_worker_argv() -> None:
    argv = worker_argv(concurrency=3, name="w1@%h", extra=["--max-tasks-per-child", "100"])
    assert argv[0] == "worker"
    assert argv[argv.index("-Q") + 1] == "blobchain"
    assert argv[argv.index("-P") + 1] == "prefork"
    assert argv[argv.index("-c") + 1] == "3"
    assert argv[argv.index("-n") + 1] == "w1@%h"
    assert "-E" in argv and "--without-mingle" in argv
    assert argv[-2:] == ["--max-tasks-per-child", "100"]


def test_harden_kombu_turns_a_detached_channel_into_a_connection_error() -> None:
    import redis
    from kombu.transport import redis as kredis

    harden_kombu()
    harden_kombu()  # idempotent
    assert kredis.Channel._connparams._blobchain_hardened
    for detached in (
        SimpleNamespace(connection=None),
        SimpleNamespace(connection=SimpleNamespace(client=None)),
    ):
        with pytest.raises(redis.exceptions.ConnectionError):
            kredis.Channel._connparams(detached)


def test_executor_needs_distributed_settings() -> None:
    with pytest.raises(ValueError, match="distributed"):
        CeleryExecutor(Settings(store="/nonexistent"), None)  # type: ignore[arg-type]  # refused first


def test_worker_log_keeps_a_line_that_20_kb_of_tracebacks_followed(tmp_path: Path) -> None:
    # Regression (stop 12's CI): the fault test waits for "Connection to broker lost", and the
    # tracebacks logged right after it (~16 KB, more with a longer venv path) pushed the line out
    # of the 20 KB tail that log() used to return before the test's first poll.
    from .conftest import WorkerProcess

    w = WorkerProcess(SETTINGS, "log", tmp_path)
    w.log_path.write_text("consumer: Connection to broker lost.\n" + "Traceback (...)\n" * 2000)
    assert "Connection to broker lost" in w.log()
    assert len(w.log_tail()) == 20000
