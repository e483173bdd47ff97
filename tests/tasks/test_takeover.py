"""Takeover within the lease TTL: a whole worker (main process and pool) SIGKILLed mid-build is
replaced by a new delivery of its task as soon as its lease expires, with the default limits; a
ref that kills every worker still ends as PoisonRef; the tracked lease's bookkeeping."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blobchain.client.api import Client, chain_specs
from blobchain.config.settings import Settings
from blobchain.layers.records import LayerOptions
from blobchain.storage.claims.redis import RedisClaimService
from blobchain.tasks.app import make_app, timing
from blobchain.tasks.inspect import RefStatus
from blobchain.tasks.layer_tasks import PROGRESS
from blobchain.tasks.poison import PoisonRef

from .conftest import VENV_BIN, built_counts, clean_env, embedded_chain, redis_for
from .test_faults import _big_chain, _check_store, _meta, _submit, _until

# The bound: recovery in under 2 minutes after kill -9 of a whole worker, defaults.
RECOVERY_BOUND_S = 120.0


# --- the tracked lease (real Redis) -----------------------------------------------------------


def test_a_tracked_lease_is_due_only_after_it_expires_unreleased(
    redis_client: Any, redis_prefix: str
) -> None:
    locks = RedisClaimService(redis_client, redis_prefix)
    tracked = locks.tracking({"task_id": "t1", "ref": "r", "message": {"task": "x"}})
    lease = tracked.try_acquire("r#gzip", 0.4)
    assert lease is not None and tracked.try_acquire("r#gzip", 0.4) is None
    info = locks.holder_info("r#gzip")
    assert info is not None and info.token == lease.token and 0 < info.ttl_ms <= 400
    assert info.delivery is not None and info.delivery["task_id"] == "t1" and info.delivery["key"] == "r#gzip"
    assert locks.take_due(hold_s=5) == []  # held
    lease.refresh()
    assert locks.take_due(hold_s=5) == []
    time.sleep(0.6)  # the holder "died": no refresh, no release
    due = locks.take_due(hold_s=5)
    assert [d.delivery["task_id"] for d in due] == ["t1"]
    assert locks.take_due(hold_s=5) == []  # claimed once: another janitor gets nothing
    locks.forget(due[0].token)
    assert redis_client.hlen(locks.deliveries_key) == 0 and redis_client.zcard(locks.due_key) == 0

    # A released lease leaves no delivery behind, and a lost one cannot be refreshed.
    lease2 = tracked.try_acquire("r#gzip", 5)
    assert lease2 is not None
    lease2.release()
    assert redis_client.hlen(locks.deliveries_key) == 0 and redis_client.zcard(locks.due_key) == 0


def test_a_due_delivery_waits_while_another_holder_has_the_ref(redis_client: Any, redis_prefix: str) -> None:
    from blobchain.storage.claims import ClaimLost

    locks = RedisClaimService(redis_client, redis_prefix)
    dead = locks.tracking({"task_id": "dead", "message": {"task": "x"}}).try_acquire("k", 0.3)
    assert dead is not None
    time.sleep(0.5)
    other = locks.tracking({"task_id": "other", "message": {"task": "x"}}).try_acquire("k", 5)
    assert other is not None
    # "dead"'s task still has to run (its chain waits for it), but not while "other" builds.
    assert locks.take_due(hold_s=5) == []
    with pytest.raises(ClaimLost):
        dead.refresh()
    other.release()
    redis_client.zadd(locks.due_key, {dead.token: 0})  # make it due now rather than in 5 s
    assert [d.delivery["task_id"] for d in locks.take_due(hold_s=5)] == ["dead"]


def test_a_due_delivery_of_a_live_worker_is_dropped_not_sent_twice(redis_client: Any, redis_prefix: str) -> None:
    # Only the pool process died: the worker (still beating) puts the message back itself.
    locks = RedisClaimService(redis_client, redis_prefix)
    locks.beat("w1@h", 10)
    lease = locks.tracking({"task_id": "t", "host": "w1@h", "message": {"task": "x"}}).try_acquire("k", 0.3)
    assert lease is not None
    time.sleep(0.5)
    assert locks.take_due(hold_s=5, recheck_s=0.1) == []  # last beat before the expiry: not sure yet
    assert redis_client.hlen(locks.deliveries_key) == 1
    locks.beat("w1@h", 10)
    time.sleep(0.15)
    assert locks.take_due(hold_s=5, recheck_s=0.1) == []
    assert redis_client.hlen(locks.deliveries_key) == 0  # dropped: the worker is alive
    # A worker that stopped beating is gone: its delivery is claimed.
    gone = locks.tracking({"task_id": "t2", "host": "w2@h", "message": {"task": "x"}}).try_acquire("k2", 0.3)
    assert gone is not None
    time.sleep(0.5)
    assert [d.delivery["task_id"] for d in locks.take_due(hold_s=5)] == ["t2"]
    assert locks.worker_alive("w1@h") and not locks.worker_alive("w2@h")


# --- real workers -----------------------------------------------------------------------------


def _default_limits(make_settings: Callable[..., Settings], **kw: Any) -> Settings:
    """The product's defaults for every timing knob (the fixtures shorten them otherwise)."""
    d = Settings.model_fields
    return make_settings(
        lease_ttl_s=d["lease_ttl_s"].default,
        soft_time_limit_s=d["soft_time_limit_s"].default,
        time_limit_s=d["time_limit_s"].default,
        takeover_poll_s=d["takeover_poll_s"].default,
        wait_budget_s=d["wait_budget_s"].default,
        **kw,
    )


def test_kill_9_of_a_whole_worker_is_taken_over_within_the_lease_ttl_with_default_limits(
    make_settings: Callable[..., Settings], snapdir: Path, workers: Any, s3_client: Any, tmp_path: Path
) -> None:
    settings = _default_limits(make_settings)
    t = timing(settings)
    assert t.visibility_timeout_s > 3600  # the broker alone would bring the message back in > 1 h
    # 48 MiB (as the poison test below): the kill lands at the first progress report, seconds
    # before the build would end; the wait for the 60 s lease is what this test takes.
    chain = _big_chain(snapdir, 48 << 20)
    app = make_app(settings)
    pair = [workers(settings, "a", cli=True, concurrency=1), workers(settings, "b", cli=True, concurrency=1)]
    for w in pair:
        w.wait_ready(app)
    with Client(settings) as client:
        job, lease_cm = _submit(client, chain, compression="gzip", level=9)
        big = job.ref_id
        tid = job.task_ids[big]
        holder: list[Any] = []

        def building() -> bool:
            meta = _meta(app, tid)
            if meta.get("status") == PROGRESS and meta["result"].get("bytes"):
                holder[:] = [w for w in pair if int(meta["result"].get("pid", -1)) in w.pids()]
            return bool(holder)

        _until(building, 120, "the big layer to be building")
        a = holder[0]
        b = pair[1] if a is pair[0] else pair[0]
        pids = a.pids()
        a.kill()  # SIGKILL to the main process and its pool child: nothing is put back
        killed_wall, killed_at = time.time(), time.monotonic()
        assert not a.alive()
        # The operator's view, through the real CLI: the dead holder still has its lease (it
        # expires up to lease_ttl_s after its last refresh), its worker and pid, the attempt.
        row = _cli_status(settings, big)[-1]
        assert row["state"] in ("running", "holder-lost") and row["holder"] == a.nodename
        assert row["pid"] in pids and row["attempts"] == 1 and row["takeovers"] == 0
        assert 0 <= row["lease_left_s"] <= settings.lease_ttl_s
        on_b: list[RefStatus] = []

        def taken_over_by_b() -> bool:
            if job.done():
                return True
            row = client.chain_status(big)[-1]
            if row.state == "running" and row.holder == b.nodename:
                on_b.append(row)
            return bool(on_b)

        _until(taken_over_by_b, RECOVERY_BOUND_S + 60, "the ref to be taken over")
        got = job.wait(RECOVERY_BOUND_S + 120)
        completed_s = time.monotonic() - killed_at
        events = list(job.events(timeout=5))
        lease_cm.__exit__(None, None, None)
        records = list(client.deps.metadata.list_refs())

    assert on_b, "the takeover on b was never seen in the status"
    assert on_b[0].attempts == 2 and on_b[0].takeovers == 1 and on_b[0].pid in b.pids()
    meta = _meta(app, tid)
    assert meta["status"] == "SUCCESS" and "taken over from" in meta["result"]["takeover"]
    takeover = _takeover_kwargs(app, tid)
    sent_s = takeover["at"] - killed_wall
    print(f"takeover sent {sent_s:.1f} s, chain completed {completed_s:.1f} s after kill -9 of {a.nodename}")
    assert sent_s < RECOVERY_BOUND_S, f"the takeover was sent {sent_s:.0f} s after the kill"
    assert takeover["from"]["host"] == a.nodename and takeover["count"] == 1
    want = embedded_chain(tmp_path / "embedded", chain, compression="gzip", level=9)
    assert got.to_dict() == want.to_dict()
    assert all(r.blob is not None and not r.variants for r in records)
    _check_store(settings, s3_client, {bl.digest for bl in got.layer_blobs()})
    variant = LayerOptions(compression="gzip", level=9).variant_key()
    # Diffs are counted as they start: the big layer's ran on a (killed) and again on b.
    want_counts = {f"{r.ref_id}#{variant}": 2 if r.ref_id == big else 1 for r in got.records}
    assert built_counts(settings) == want_counts
    assert any(ev.ref_id == big and ev.note and "taken over" in ev.note for ev in events)
    r = redis_for(settings)
    try:
        assert int(r.get(f"{settings.key_prefix}stats:takeovers:{big}#{variant}") or 0) == 1
        assert r.hlen(f"{settings.key_prefix}deliveries") == 0  # nothing left to take over
    finally:
        r.close()
    assert "taking over" in b.log()


def _cli_status(settings: Settings, ref: str) -> list[dict[str, Any]]:
    r = subprocess.run(
        [str(VENV_BIN / "blobchain"), "status", ref, "--json"],
        capture_output=True,
        text=True,
        env=clean_env(settings),
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["chain"]


def _takeover_kwargs(app: Any, task_id: str) -> dict[str, Any]:
    """What the final delivery of ``task_id`` says about its takeover (from its result)."""
    return dict(app.backend.get_task_meta(task_id)["result"]["taken_over"])


def test_a_ref_that_kills_every_worker_whole_fails_as_poison_through_takeovers(
    make_settings: Callable[..., Settings], snapdir: Path, workers: Any
) -> None:
    # Each time the ref builds, its whole worker is SIGKILLed; a fresh worker replaces it. With
    # the default (hour-long) limits the broker never brings the messages back during the test:
    # every new attempt is a takeover, and the crash counter still stops them.
    settings = make_settings(
        max_attempts=2, lease_ttl_s=3.0, takeover_poll_s=1.0, soft_time_limit_s=3300, time_limit_s=3600
    )
    chain = _big_chain(snapdir, 48 << 20)
    app = make_app(settings)
    current = [workers(settings, "p0", concurrency=1)]
    current[0].wait_ready(app)
    kills = 0
    with Client(settings) as client:
        job, lease_cm = _submit(client, chain, compression="gzip", level=9)
        tid = job.task_ids[job.ref_id]
        seen: set[int] = set()
        deadline = time.monotonic() + 300
        while not job.done() and time.monotonic() < deadline:
            meta = _meta(app, tid)
            w = current[-1]
            # Bytes written: the diff itself runs (a takeover announces itself before it starts).
            if meta.get("status") == PROGRESS and meta["result"].get("bytes"):
                pid = int(meta["result"].get("pid", -1))
                if pid not in seen and pid in w.pids():
                    seen.add(pid)
                    w.kill()
                    kills += 1
                    nxt = workers(settings, f"p{kills}", concurrency=1)
                    nxt.wait_ready(app)
                    current.append(nxt)
            time.sleep(0.05)
        with pytest.raises(PoisonRef) as info:
            job.wait(10)
        lease_cm.__exit__(None, None, None)
        assert info.value.details["crashes"] == settings.max_attempts
        assert kills == settings.max_attempts
        assert client.status(job.ref_id).blob is None
    assert current[-1].alive()
    variant = LayerOptions(compression="gzip", level=9).variant_key()
    # The base once. The poison ref's diff started on the first attempt and at most once per
    # later one (a takeover reports progress before its diff starts, so a kill can land first),
    # and never after the limit.
    counts = built_counts(settings)
    assert counts.pop(f"{chain_specs(chain)[0].ref_id}#{variant}") == 1
    assert 1 <= counts.pop(f"{job.ref_id}#{variant}") <= kills
    assert counts == {}
