"""Distributed mode (Celery + Redis + SeaweedFS S3): worker scaling, per-ref overhead, uploads.

    python -m bench.run_distributed [--scale 1] [--refs 50] [--threads N]

Services: a private ``redis-server`` and SeaweedFS ``weed mini`` started by the test helpers
(``tests/services.py``) on free 127.0.0.1 ports, stopped at the end. Workers are real
``blobchain worker -c 1`` processes started here (each its own process group), ready (Celery
ping) before anything is timed. Every run uses a fresh Redis key prefix and S3 prefix, so
nothing is reused between runs unless that is the point.

1. Scaling: the export chain (:mod:`bench.chains`, gzip) through 1 then 2 workers; wall time
   from submit to result, per-layer build times (from the job's events: ±0.5 s polling), and the
   bound the chain itself sets: with 2 workers a chain cannot finish before its longest layer,
   nor before half the total work. Same chain embedded (``Client`` with ``jobs`` 1 and 2) for
   reference, and the diffIDs/digests checked equal across all runs.
2. Per-ref overhead when the blob exists: a chain of ``--refs`` tiny states, built once, then
   submitted again ``--repeat`` times; time per ref, distributed (2 workers) vs embedded.
3. Upload throughput: a 256 MiB and a 1 GiB blob written through the product's S3 content store
   (multipart parts, then the server-side copy to the digest key), vs the local OCI store.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.chains import Chain, build_chain, default_workdir
from bench.common import (
    BLOBCHAIN,
    REPO,
    blobchain_env,
    machine_busy_s,
    md_table,
    print_machine,
    rm_tree,
    wait_quiet,
    warm,
)
from blobchain.client.api import Client
from blobchain.config.factory import open_deps
from blobchain.config.settings import Settings
from blobchain.storage.content.local import LocalContentStore
from blobchain.workers.executor import FINISHED, RUNNING

HOST = socket.gethostname()


def _services() -> Any:
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import services

    return services


# --- settings and workers -------------------------------------------------------------------------


def dist_settings(redis: Any, s3: Any, roots: Sequence[str], threads: int | None) -> Settings:
    tag = uuid.uuid4().hex[:10]
    return Settings(
        broker_url=redis.url_for(1),
        result_url=redis.url_for(2),
        lock_url=redis.url_for(3),
        key_prefix=f"bench:{tag}:",
        s3_endpoint=s3.endpoint,
        s3_region=s3.region,
        s3_bucket=s3.bucket,
        s3_prefix=f"bench-{tag}/",
        s3_access_key=s3.access_key,
        s3_secret_key=s3.secret_key,
        roots=tuple(roots),
        threads=threads,
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """``settings`` as ``BLOBCHAIN_*`` variables for the worker processes."""
    env: dict[str, str] = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        elif isinstance(value, tuple):
            value = os.pathsep.join(value)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[f"BLOBCHAIN_{name.upper()}"] = str(value)
    return env


@contextlib.contextmanager
def workers(
    settings: Settings, n: int, logdir: Path, client: Client, cpus: Sequence[int] | None = None
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``n`` ``blobchain worker -c 1`` processes, ready when the block starts, stopped after.
    ``cpus``: pin worker i (main process and pool) to core ``cpus[i]`` (``taskset``)."""
    procs: list[subprocess.Popen[bytes]] = []
    names = [f"bench{i}-{uuid.uuid4().hex[:6]}@{HOST}" for i in range(n)]
    env = blobchain_env(**settings_env(settings))
    try:
        for i, name in enumerate(names):
            pin = ["taskset", "-c", str(cpus[i])] if cpus is not None else []
            with open(logdir / f"worker-{name.split('@')[0]}.log", "ab") as log:
                procs.append(
                    subprocess.Popen(
                        [*pin, BLOBCHAIN, "worker", "-c", "1", "-n", name],
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        cwd="/",
                        start_new_session=True,
                    )
                )
        app = client.executor.app  # type: ignore[attr-defined]
        deadline = time.monotonic() + 120
        for p, name in zip(procs, names, strict=True):
            while not app.control.ping(destination=[name], timeout=0.5):
                if p.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker {name} did not start (see {logdir})")
                time.sleep(0.2)
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)  # the group we started: the worker and its pool
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)


# --- running a chain ----------------------------------------------------------------------------


@dataclass
class ChainRun:
    label: str
    wall_s: float
    machine_cpu_s: float = 0.0  # CPU of the whole machine during the run (workers, services, client)
    layer_s: dict[str, float] = field(default_factory=dict)  # ref -> running..finished
    digests: list[tuple[str, str]] = field(default_factory=list)  # (diff_id, digest) per layer


def run_chain(client: Client, states: Sequence[Path], label: str, level: int | None = None) -> ChainRun:
    specs = client.register_chain([str(s) for s in states])
    started: dict[str, float] = {}
    ended: dict[str, float] = {}
    with client.lease() as lease:
        b0 = machine_busy_s()[0]
        t0 = time.perf_counter()
        job = client.compute_blob_chain(specs[-1].ref_id, compression="gzip", level=level, lease=lease)
        for ev in job.events():
            now = time.perf_counter()
            if ev.state == RUNNING:
                started.setdefault(ev.ref_id, now)
            elif ev.state in FINISHED:
                ended.setdefault(ev.ref_id, now)
        result = job.wait(timeout=3600)
        wall = time.perf_counter() - t0
        busy = machine_busy_s()[0] - b0
    layers = result.to_dict()["layers"]
    run = ChainRun(label, wall, busy)
    run.digests = [(x["diff_id"], x["digest"]) for x in layers]
    for s in specs:
        if s.ref_id in ended:
            run.layer_s[s.ref_id] = ended[s.ref_id] - started.get(s.ref_id, t0)
    return run


def embedded_client(store: Path, jobs: int, threads: int | None) -> Client:
    return Client(Settings(store=str(store), jobs=jobs, threads=threads), jobs=jobs)


# --- 1. scaling ---------------------------------------------------------------------------------


def bench_scaling(chain: Chain, redis: Any, s3: Any, work: Path, threads: int | None, repeat: int) -> str:
    runs: list[ChainRun] = []
    for _ in range(repeat):
        for n in (1, 2):
            settings = dist_settings(redis, s3, [str(chain.root)], threads)
            with Client(settings) as client, workers(settings, n, work, client):
                wait_quiet()
                r = run_chain(client, chain.states, f"distributed, {n} worker{'s' * (n > 1)} (-c 1)")
            runs.append(r)
            _say(f"{r.label}: {r.wall_s:.1f} s, layers {[round(x, 1) for x in r.layer_s.values()]}")
        for jobs in (1, 2):
            store = work / "embedded-store"
            rm_tree(store)
            with embedded_client(store, jobs, threads) as client:
                wait_quiet()
                r = run_chain(client, chain.states, f"embedded, jobs={jobs}")
            rm_tree(store)
            runs.append(r)
            _say(f"{r.label}: {r.wall_s:.1f} s")

    ref = runs[0].digests
    same = all(r.digests == ref for r in runs)
    by_label: dict[str, list[ChainRun]] = {}
    for r in runs:
        by_label.setdefault(r.label, []).append(r)

    def med(label: str) -> ChainRun:
        rs = sorted(by_label[label], key=lambda r: r.wall_s)
        return rs[(len(rs) - 1) // 2]

    one, two = med("distributed, 1 worker (-c 1)"), med("distributed, 2 workers (-c 1)")
    layer_times = list(one.layer_s.values())
    bound = sum(layer_times) / max(max(layer_times), sum(layer_times) / 2) if layer_times else 0
    rows = []
    for label, rs in by_label.items():
        m = med(label)
        rows.append(
            [
                label,
                f"{m.wall_s:.1f}",
                f"{m.machine_cpu_s:.1f}",
                f"{m.machine_cpu_s / m.wall_s:.2f}",
                " ".join(f"{x:.1f}" for x in m.layer_s.values()) or "-",
                f"{one.wall_s / m.wall_s:.2f}×",
                " ".join(f"{r.wall_s:.1f}" for r in rs),
            ]
        )
    out = md_table(
        [
            "run",
            "wall s (median)",
            "machine CPU s",
            "cores busy",
            "per-layer s",
            "speed-up vs 1 worker",
            "all runs",
        ],
        rows,
    )
    ratio = one.wall_s / two.wall_s
    # Two bounds on the 2-worker speed-up: the chain's shape (no run ends before its longest layer,
    # nor before half the total layer time), and the cores (the run's machine CPU spread on nproc).
    cpu_bound = one.wall_s * (os.cpu_count() or 1) / two.machine_cpu_s if two.machine_cpu_s else 0
    out += (
        f"\n\nScaling 1 → 2 workers: **{ratio:.2f}×** (target ≥ 1.8×: {'met' if ratio >= 1.8 else '**not met**'}). "
        f"Bounds for 2 workers: the chain's shape allows {bound:.2f}× (total layer time / max(longest layer, "
        f"half the total), from the 1-worker per-layer times); the cores allow {cpu_bound:.2f}× (1-worker wall × "
        f"{os.cpu_count()} cores / machine CPU of the 2-worker run). Machine CPU = every process on the box "
        "during the run (workers, redis-server, weed, this client; runs start when the box is idle). "
        f"diffIDs and blob digests equal in every run: {'yes' if same else 'NO'}."
    )
    return out


# --- 2. per-ref overhead ------------------------------------------------------------------------


def tiny_chain(root: Path, n: int) -> list[Path]:
    """``n`` small full states: state i holds files 0..i (so each layer adds one file)."""
    states = []
    t = 1_700_000_000 * 10**9
    for i in range(n):
        s = root / f"s{i:03d}"
        s.mkdir(parents=True, exist_ok=True)
        for j in range(i + 1):
            f = s / f"f{j:03d}"
            if not f.exists():
                f.write_bytes(b"layer %d\n" % j)
                os.utime(f, ns=(t + j, t + j))
        os.utime(s, ns=(t + i, t + i))
        states.append(s)
    return states


def bench_overhead(redis: Any, s3: Any, work: Path, n: int, repeat: int, threads: int | None) -> str:
    root = work / "tiny"
    rm_tree(root)
    states = tiny_chain(root, n)
    emb, dist = "embedded", "distributed (2 workers)"
    times: dict[tuple[str, int], list[float]] = {(emb, n): [], (emb, 1): [], (dist, n): [], (dist, 1): []}

    def measure(client: Client, path: str) -> None:
        run_chain(client, states, "warm-up")  # builds the blobs (and starts the pool)
        for _ in range(repeat):
            for k in (n, 1):  # the whole chain, and a chain of its base ref alone
                times[(path, k)].append(run_chain(client, states[:k], "cached").wall_s)

    store = work / "tiny-store"
    rm_tree(store)
    with embedded_client(store, 2, threads) as client:
        measure(client, emb)
    rm_tree(store)
    settings = dist_settings(redis, s3, [str(root)], threads)
    with Client(settings) as client, workers(settings, 2, work, client):
        measure(client, dist)
    rm_tree(root)

    def med(xs: list[float]) -> float:
        return sorted(xs)[(len(xs) - 1) // 2]

    rows = [
        [path, k, f"{med(v):.3f}", f"{med(v) / k * 1000:.1f}", " ".join(f"{x:.3f}" for x in v)]
        for (path, k), v in times.items()
    ]
    over = (med(times[(dist, n)]) - med(times[(emb, n)])) / n * 1000
    single = (med(times[(dist, 1)]) - med(times[(emb, 1)])) * 1000
    out = md_table(["path", "refs in the chain", "chain s (median)", "ms per ref", "all runs s"], rows)
    out += (
        f"\n\nDistributed overhead per ref when the blob exists: **{over:.1f} ms** over a {n}-ref chain "
        f"(target < 50 ms: {'met' if over < 50 else '**not met**'}); a 1-ref chain costs {single:.0f} ms more "
        "than embedded end to end (submit, the worker's lookup, the chord's finalize, and the client's "
        "result polling, which starts at 50 ms intervals). Each run: register, lease, submit, wait, chain IDs."
    )
    return out


# --- 4. pinned scale-out ------------------------------------------------------------------------


def balanced_chain(root: Path, layers: int, mib: int) -> list[Path]:
    """``layers`` full states, each adding ``mib`` MiB of real file bytes (``/usr/lib`` contents,
    read in sorted order, so the data compresses like a real layer) in 8 MiB files; earlier
    files are hard links (unchanged in later layers), so every layer costs about the same."""
    src: list[Path] = []
    for top in ("/usr/lib", "/usr/share", "/usr/bin"):
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            src += [Path(dirpath) / f for f in sorted(filenames)]

    def chunks() -> Iterator[bytes]:
        while True:
            for f in src:
                if f.is_symlink() or not f.is_file():
                    continue
                with contextlib.suppress(OSError):
                    yield f.read_bytes()

    data = chunks()
    buf = b""
    t = 1_700_000_000 * 10**9
    states: list[Path] = []
    for i in range(layers):
        s = root / f"layer{i:02d}"
        if not (s / ".done").exists():
            rm_tree(s)
            s.mkdir(parents=True)
            (s / "data").mkdir()
            if states:  # earlier layers' files: hard links, the same inodes
                for f in sorted((states[-1] / "data").iterdir()):
                    os.link(f, s / "data" / f.name)
            for j in range(max(1, mib // 8)):
                while len(buf) < 8 << 20:
                    buf += next(data)
                f = s / "data" / f"l{i:02d}-{j:02d}.bin"
                f.write_bytes(buf[: 8 << 20])
                buf = buf[8 << 20 :]
                os.utime(f, ns=(t + i, t + i))
            os.utime(s / "data", ns=(t + i, t + i))
            (s / ".done").write_bytes(b"")
            os.utime(s / ".done", ns=(t, t))
            os.utime(s, ns=(t, t))
        states.append(s)
    return states


def bench_pinned(redis: Any, s3: Any, work: Path, layers: int, mib: int, repeat: int) -> str:
    """1 worker pinned to core 0 vs 2 workers pinned to cores 0 and 1, one compression thread
    each, on a chain of equal layers (fresh key and S3 prefixes every run: every layer is built)."""
    ncpu = len(os.sched_getaffinity(0))
    if ncpu < 2:
        return "(skipped: fewer than 2 cores)"
    root = work.parent / "balanced"
    states = balanced_chain(root, layers, mib)
    runs: dict[int, list[ChainRun]] = {1: [], 2: []}
    for _ in range(repeat):
        for n in (1, 2):
            settings = dist_settings(redis, s3, [str(root)], 1)
            with Client(settings) as client, workers(settings, n, work, client, cpus=list(range(n))):
                wait_quiet(timeout_s=60)
                r = run_chain(client, states, f"{n} worker{'s' * (n > 1)} on {n} core{'s' * (n > 1)}")
            runs[n].append(r)
            _say(f"pinned {r.label}: {r.wall_s:.1f} s, layers {[round(x, 1) for x in r.layer_s.values()]}")
    same = len({tuple(r.digests) for rs in runs.values() for r in rs}) == 1

    def med(rs: list[ChainRun]) -> ChainRun:
        return sorted(rs, key=lambda r: r.wall_s)[(len(rs) - 1) // 2]

    one, two = med(runs[1]), med(runs[2])
    rows = [
        [
            m.label,
            f"{m.wall_s:.1f}",
            f"{m.machine_cpu_s:.1f}",
            f"{sum(m.layer_s.values()) / max(len(m.layer_s), 1):.2f}",
            f"{one.wall_s / m.wall_s:.2f}×",
            " ".join(f"{r.wall_s:.1f}" for r in rs),
        ]
        for m, rs in ((one, runs[1]), (two, runs[2]))
    ]
    out = md_table(["run", "wall s (median)", "machine CPU s", "mean layer s", "speed-up", "all runs s"], rows)
    ratio = one.wall_s / two.wall_s
    out += (
        f"\n\n{layers} layers × {mib} MiB, gzip (default level), `BLOBCHAIN_THREADS=1`, each worker "
        f"`taskset -c <core>` (main process and pool child). Scale-out 1 → 2 workers: **{ratio:.2f}×** "
        f"(goal ≥ 1.8×: {'met' if ratio >= 1.8 else '**not met**'}). redis-server, weed and this client are not "
        f"pinned and share the two cores. diffIDs and digests equal in every run: {'yes' if same else 'NO'}."
    )
    return out


# --- 5. Redis latency ---------------------------------------------------------------------------


def _netsim() -> Any:
    _services()
    import netsim

    return netsim


def _via(url: str, host: str, port: int) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts._replace(netloc=f"{host}:{port}").geturl()


def bench_latency(redis: Any, s3: Any, work: Path, rtts_ms: Sequence[float], refs: int, repeat: int) -> str:
    """Per-ref overhead (cached refs) and a small chain's wall time (every layer built) with
    ``rtts_ms`` of round-trip time to Redis for the workers and the client (a delaying proxy;
    0 ms = the proxy without delay)."""
    from pydantic import SecretStr

    netsim = _netsim()
    rows = []
    for rtt in rtts_ms:
        root = work / f"lat-{rtt:g}"
        rm_tree(root)
        tiny = tiny_chain(root / "tiny", refs)
        base = dist_settings(redis, s3, [str(root)], None)
        with netsim.TcpProxy("127.0.0.1", (redis.host, redis.port), delay_s=rtt / 2000) as px:
            b, r_, lk = base.redis_urls()
            settings = base.model_copy(
                update={
                    "broker_url": SecretStr(_via(b, px.host, px.port)),
                    "result_url": SecretStr(_via(r_, px.host, px.port)),
                    "lock_url": SecretStr(_via(lk, px.host, px.port)),
                }
            )
            with Client(settings) as client, workers(settings, 2, work, client):
                run_chain(client, tiny, "warm-up")
                cached = []
                for _ in range(repeat):
                    px.reset()
                    cached.append(run_chain(client, tiny, "cached").wall_s)
                cached_rt = px.reset() / max(repeat, 1) / refs
                small = []
                for k in range(repeat):
                    fresh = tiny_chain(root / f"small{k}", 5)
                    px.reset()
                    small.append(run_chain(client, fresh, "small").wall_s)
                small_rt = px.reset() / max(repeat, 1) / 5
        rm_tree(root)

        def med(xs: list[float]) -> float:
            return sorted(xs)[(len(xs) - 1) // 2]

        rows.append(
            [
                f"{rtt:g}",
                f"{med(cached) / refs * 1000:.1f}",
                f"{cached_rt:.0f}",
                f"{med(small):.2f}",
                f"{small_rt:.0f}",
                " ".join(f"{x:.2f}" for x in small),
            ]
        )
    out = md_table(
        [
            "RTT to Redis ms",
            f"cached ref ms (chain of {refs})",
            "Redis round trips per cached ref (all clients)",
            "5-layer chain, built, wall s",
            "round trips per built ref (all clients)",
            "all small-chain runs s",
        ],
        rows,
    )
    out += (
        "\n\nEvery Redis connection of the two workers (broker, results, locks) and of the client goes "
        "through one proxy that delays each chunk by RTT/2 each way (no netem here). Round trips are "
        "counted by the proxy: a client write after a server reply; they include Celery's own traffic "
        "(broker fetch and acks, task events, result writes, the client's result polling), not only "
        "blobchain's (which tests/tasks/test_network.py counts alone: 14-15 per built ref, 3 per cached ref)."
    )
    return out


# --- 6. operations per ref (for the scale model) ------------------------------------------------


def _commandstats(client: Any) -> dict[str, int]:
    return {k.split("_", 1)[1] if k.startswith("cmdstat_") else k: int(v["calls"]) for k, v in client.info("commandstats").items()}


def bench_ops(redis: Any, s3: Any, work: Path, layers: int, mib: int) -> str:
    """Redis commands, S3 requests and bytes, broker messages per ref for one build of the
    balanced chain by 2 workers, and for a resubmission (every ref cached)."""
    netsim = _netsim()
    root = work.parent / "balanced"
    states = balanced_chain(root, layers, mib)
    rc = redis.client(0)
    rows = []
    s3_host, s3_port = s3.endpoint.rsplit("//", 1)[1].split(":")
    with netsim.TcpProxy("127.0.0.1", (s3_host, int(s3_port))) as sp:
        settings = dist_settings(redis, s3, [str(root)], None).model_copy(
            update={"s3_endpoint": f"http://127.0.0.1:{sp.port}"}
        )
        with Client(settings) as client, workers(settings, 2, work, client):
            for label in ("built", "cached"):
                before = _commandstats(rc)
                sp.reset()
                run_chain(client, states, label)
                after = _commandstats(rc)
                calls = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                total = sum(v for k, v in calls.items() if k != "info")
                pushes = calls.get("lpush", 0) + calls.get("rpush", 0)
                rows.append(
                    [
                        label,
                        f"{total / layers:.0f}",
                        f"{calls.get('evalsha', 0) / layers:.1f}",
                        f"{pushes / layers:.2f}",
                        f"{calls.get('publish', 0) / layers:.1f}",
                        f"{sp.round_trips / layers:.1f}",
                        f"{sp.bytes_up / layers / 2**20:.1f} / {sp.bytes_down / layers / 2**20:.2f}",
                    ]
                )
    rc.close()
    out = md_table(
        [
            "submission",
            "Redis commands per ref (all, incl. inside scripts)",
            "of which EVALSHA",
            "broker messages per ref (LPUSH/RPUSH)",
            "PUBLISH per ref (events, results)",
            "S3 requests per ref",
            "S3 MiB per ref (up / down)",
        ],
        rows,
    )
    out += (
        f"\n\n{layers} layers × {mib} MiB through 2 workers; Redis `INFO commandstats` deltas over the "
        "whole server (broker, results, locks, the client's polling and Flower-style events); S3 "
        "requests counted by a proxy in front of SeaweedFS."
    )
    return out


# --- 3. uploads ---------------------------------------------------------------------------------


def _tree_cpu(pid: int | None) -> float:
    """CPU seconds (user + sys) of a process and its children, 0 if unknown."""
    if pid is None:
        return 0.0
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def _ingest(store: Any, size: int, chunk: bytes, server: int | None) -> tuple[float, float, float, float]:
    """(write s, commit s, CPU s of this process, CPU s of the server) for one blob."""
    s0 = _tree_cpu(server)
    c0 = time.process_time()
    t0 = time.perf_counter()
    ing = store.ingest(f"bench-{uuid.uuid4().hex}")
    ing.write(uuid.uuid4().bytes * 4)  # a new digest every time
    left = size - 64
    while left > 0:
        piece = chunk[: min(len(chunk), left)]
        ing.write(piece)
        left -= len(piece)
    t1 = time.perf_counter()
    info = ing.commit(size=size)
    t2 = time.perf_counter()
    assert info.size == size
    cpu, server_cpu = time.process_time() - c0, _tree_cpu(server) - s0
    store.delete(info.digest)
    return t1 - t0, t2 - t1, cpu, server_cpu


def bench_uploads(redis: Any, s3: Any, work: Path, sizes: Sequence[int], repeat: int) -> str:
    chunk = os.urandom(8 << 20)  # incompressible, so no layer of the stack can cheat
    settings = dist_settings(redis, s3, [], None)
    s3store = open_deps(settings).content
    local = LocalContentStore(str(work / "upload-local"))
    weed = s3.process.pid if s3.process is not None else None
    rows = []
    for size in sizes:
        wait_quiet()
        for name, store, server in (
            ("S3 (SeaweedFS weed mini)", s3store, weed),
            ("local OCI layout", local, None),
        ):
            res = [_ingest(store, size, chunk, server) for _ in range(repeat)]
            w, c, cpu, scpu = sorted(res, key=lambda r: r[0] + r[1])[(len(res) - 1) // 2]
            rows.append(
                [
                    name,
                    f"{size / 2**20:.0f}",
                    f"{w:.2f}",
                    f"{c:.2f}",
                    f"{size / 2**20 / w:.0f}",
                    f"{size / 2**20 / (w + c):.0f}",
                    f"{cpu:.1f}",
                    f"{scpu:.1f}" if server else "-",
                ]
            )
            _say(f"upload {name} {size >> 20} MiB: write {w:.2f} s commit {c:.2f} s")
    rm_tree(work / "upload-local")
    out = md_table(
        [
            "store",
            "blob MiB",
            "write s",
            "commit s",
            "write MiB/s",
            "end-to-end MiB/s",
            "client CPU s",
            "server CPU s",
        ],
        rows,
    )
    out += (
        "\n\nS3 write = sha256 + 8 MiB multipart parts (2 in flight) to a temporary key; commit = complete "
        "the upload, server-side copy to `blobs/sha256/<digest>` (If-None-Match), delete the temporary key. "
        "Median of the runs."
    )
    return out


# --- main ---------------------------------------------------------------------------------------


def _say(msg: str) -> None:
    print(f"[distributed] {msg}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--refs", type=int, default=50, help="refs in the overhead chain")
    ap.add_argument("--repeat", type=int, default=1, help="scaling runs per configuration")
    ap.add_argument(
        "--threads", type=int, default=None, help="compression threads per layer (default: all cores)"
    )
    ap.add_argument("--pinned-layers", type=int, default=8, help="layers of the pinned scale-out chain")
    ap.add_argument("--pinned-mib", type=int, default=96, help="MiB each layer of that chain adds")
    ap.add_argument("--rtts", default="0,1,5", help="RTTs to Redis (ms) for the latency run")
    ap.add_argument("--only", default="scaling,overhead,uploads,pinned,latency,ops")
    a = ap.parse_args(argv)
    only = set(a.only.split(","))
    workdir = a.workdir or default_workdir()
    svc = _services()
    print_machine("Distributed: Celery workers, Redis, SeaweedFS")
    chain = None
    if "scaling" in only:
        chain = build_chain(workdir, scale=a.scale, seed=a.seed)
        warm(chain.states)
    base = workdir / "distributed"
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="run-", dir=base) as tmp:
        work = Path(tmp)
        with svc.redis_service(work / "redis") as redis, svc.s3_service(work / "s3") as s3:
            if "scaling" in only and chain is not None:
                print(f"### 1. Scaling: {len(chain.states)}-layer chain (scale {chain.scale:g}), gzip\n")
                print(bench_scaling(chain, redis, s3, work, a.threads, a.repeat) + "\n", flush=True)
            if "overhead" in only:
                print(f"### 2. Per-ref overhead, blobs already there ({a.refs} refs)\n")
                print(bench_overhead(redis, s3, work, a.refs, 5, a.threads) + "\n", flush=True)
            if "uploads" in only:
                print("### 3. Upload throughput, large blobs\n")
                print(bench_uploads(redis, s3, work, [256 << 20, 1 << 30], 3) + "\n", flush=True)
            if "pinned" in only:
                print("### 4. Scale-out, one worker per core\n")
                print(bench_pinned(redis, s3, work, a.pinned_layers, a.pinned_mib, a.repeat) + "\n", flush=True)
            if "latency" in only:
                print("### 5. Latency to Redis\n")
                rtts = [float(x) for x in a.rtts.split(",")]
                print(bench_latency(redis, s3, work, rtts, a.refs, max(3, a.repeat)) + "\n", flush=True)
            if "ops" in only:
                print("### 6. Operations per ref\n")
                print(bench_ops(redis, s3, work, a.pinned_layers, a.pinned_mib) + "\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
