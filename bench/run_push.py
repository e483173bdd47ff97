"""Push to a registry: ``blobchain push`` (from a layout, and from S3) vs ``skopeo copy``, same run.

    python -m bench.run_push [--layer-mib 205] [--layers 5] [--repeat 3] [--workdir DIR]

The image: ``--layers`` layers of ``--layer-mib`` MiB of incompressible data each (uncompressed
tar, so the bytes pushed are what is measured, not a compressor), exported by blobchain to an
OCI layout. The registry: Debian's ``docker-registry`` (distribution 2.8), plain HTTP on
127.0.0.1, filesystem storage; **a fresh, empty registry for every timed first push**, so every
tool uploads every byte. Timed, each as a whole command (process start included):

- ``blobchain push OUT:v1 127.0.0.1:P/bench/app:v1 --insecure -q``;
- ``skopeo copy --dest-tls-verify=false oci:OUT:v1 docker://127.0.0.1:P/bench/app:v1``;
- the same blobchain push from S3 (SeaweedFS ``weed mini``): the layout's blobs are first put in
  the product's S3 content store; the pushed process streams them from S3 (ranged GETs) with the
  manifest and config from memory, nothing on local disk;
- second pushes of the same image to the same registry (every blob a HEAD hit), both tools.

Wall and CPU (the process tree, ``RUSAGE_CHILDREN``); the registry's CPU is counted too (it is
the same for every tool). Medians of ``--repeat`` runs, each run listed. Hold the shared lock
(``flock /tmp/blobchain-bench.lock``): other load may be present, see ``others' CPU s``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import (
    BLOBCHAIN,
    REPO,
    Meter,
    blobchain_env,
    md_table,
    mib,
    print_machine,
    rm_tree,
    wait_quiet,
)


def _helpers() -> tuple[Any, Any]:
    for p in (REPO / "tests", REPO / "tests" / "registry"):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))
    import regservice
    import services

    return services, regservice


def build_layout(work: Path, layers: int, layer_mib: int) -> tuple[str, int]:
    """The chain (each state adds one file of random bytes) exported uncompressed; cached."""
    out = work / "oci"
    marker = work / f"layout-{layers}x{layer_mib}.done"
    if marker.exists():
        return str(out), int(marker.read_text())
    rm_tree(work)
    work.mkdir(parents=True)
    snaps = []
    prev: Path | None = None
    for i in range(layers):
        snap = work / "snaps" / f"s{i}"
        snap.mkdir(parents=True)
        if prev is not None:
            for p in prev.iterdir():
                os.link(p, snap / p.name)
        with open(snap / f"layer{i}.bin", "wb") as f:
            for _ in range(layer_mib):
                f.write(os.urandom(1 << 20))
        snaps.append(str(snap))
        prev = snap
    r = subprocess.run(
        [BLOBCHAIN, "export", *snaps, "--oci", str(out), "--tag", "v1", "-c", "uncompressed", "-q", "--json"],
        env=blobchain_env(),
        capture_output=True,
        check=True,
    )
    total = sum(layer["size"] for layer in json.loads(r.stdout)["layers"])
    marker.write_text(str(total))
    return str(out), total


_S3_CHILD = """
import json, sys
from blobchain.client.push import StoreSource
from blobchain.registry import LayoutSource, TransportOptions, parse_reference, push
from blobchain.storage.content.s3 import S3ContentStore, make_s3_client
layout, target, endpoint, key, secret, bucket, prefix = sys.argv[1:8]
plan = LayoutSource(layout).plan("v1")
small = {d.digest: LayoutSource(layout).read(d.digest) for d in plan.blobs if d.size < (1 << 20)}
small.update({d.digest: data for d, data in plan.manifests})
store = S3ContentStore(make_s3_client(endpoint, "us-east-1", key, secret), bucket, prefix=prefix)
res = push(plan, StoreSource(store, small), parse_reference(target), TransportOptions(insecure=True))
print(json.dumps(res.to_dict()))
"""


def to_s3(layout: str, s3: Any, prefix: str) -> None:
    from blobchain.registry import LayoutSource
    from blobchain.storage.content.s3 import S3ContentStore, make_s3_client

    store = S3ContentStore(
        make_s3_client(s3.endpoint, s3.region, s3.access_key, s3.secret_key), s3.bucket, prefix=prefix
    )
    src = LayoutSource(layout)
    for d in src.plan("v1").blobs:
        if d.size >= 1 << 20 and store.info(d.digest) is None:
            with src.open_at(d.digest, 0) as f, store.ingest(f"bench-{d.digest[7:19]}") as ing:
                while chunk := f.read(8 << 20):
                    ing.write(chunk)
                ing.commit(size=d.size, expected=d.digest)


def timed(argv: list[str], reg: Any, env: dict[str, str] | None = None) -> tuple[Any, bytes]:
    wait_quiet(max_busy=0.5, timeout_s=30)  # a shared machine: do not wait for long
    with Meter(external=[reg.pid]) as m:
        r = m.run(argv, env=env or blobchain_env())
    return m.usage, r.stdout


def _api_again(layout: str, target: str) -> Any:
    """The same second push through the Python API in this process: the push itself, without
    the interpreter start and imports a CLI run pays."""
    from bench.common import Usage
    from blobchain.client.push import push_layout
    from blobchain.registry import TransportOptions

    wait_quiet(max_busy=0.5, timeout_s=30)
    import time

    t0, c0 = time.perf_counter(), time.process_time()
    res = push_layout(layout, "v1", target, options=TransportOptions(insecure=True))
    assert res.sent == 0
    return Usage(time.perf_counter() - t0, time.process_time() - c0, 0.0, 0, 0, os.getloadavg()[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--layer-mib", type=int, default=205)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default=os.environ.get("BLOBCHAIN_BENCH_DIR", "/var/tmp/blobchain-bench"))
    a = ap.parse_args(argv)
    services, regservice = _helpers()
    skopeo = shutil.which("skopeo")
    if not skopeo or not shutil.which("docker-registry"):
        print("needs skopeo and docker-registry", file=sys.stderr)
        return 2
    work = Path(a.workdir) / "push"
    layout, total = build_layout(work / "image", a.layers, a.layer_mib)
    print_machine("Push to a registry: blobchain push vs skopeo copy")
    print(f"Image: {a.layers} layers, {mib(total)} MiB (uncompressed tar of random bytes), layout `{layout}`\n")
    rows: dict[str, list[Any]] = {
        k: [] for k in ("blobchain", "skopeo", "blobchain-s3", "blobchain-2nd", "api-2nd", "skopeo-2nd")
    }
    with tempfile.TemporaryDirectory(prefix="run-", dir=work) as tmp:
        t = Path(tmp)
        with services.s3_service(t / "s3") as s3:
            to_s3(layout, s3, "bench/")
            for i in range(a.repeat):
                for tool in ("blobchain", "skopeo", "blobchain-s3"):
                    with regservice.registry(t / f"reg-{tool}-{i}") as reg:
                        target = f"{reg.address}/bench/app:v1"
                        if tool == "blobchain":
                            cmd = [BLOBCHAIN, "push", f"{layout}:v1", target, "--insecure", "-q", "--json"]
                        elif tool == "skopeo":
                            cmd = [
                                skopeo,
                                "copy",
                                "-q",
                                "--dest-tls-verify=false",
                                f"oci:{layout}:v1",
                                f"docker://{target}",
                            ]
                        else:
                            cmd = [
                                sys.executable, "-c", _S3_CHILD, layout, target,
                                s3.endpoint, s3.access_key, s3.secret_key, s3.bucket, "bench/",
                            ]  # fmt: skip
                        usage, _ = timed(cmd, reg)
                        rows[tool].append(usage)
                        if tool != "blobchain-s3":
                            again, out = timed(cmd, reg)
                            rows[f"{tool}-2nd"].append(again)
                            if tool == "blobchain":
                                assert json.loads(out)["bytes_sent"] == 0
                                rows["api-2nd"].append(_api_again(layout, target))
                    rm_tree(t / f"reg-{tool}-{i}")
    header = [
        "push",
        "wall s (median)",
        "runs",
        "CPU s (median)",
        "MiB/s",
        "vs skopeo (wall)",
        "others' CPU s",
    ]
    ref = statistics.median(u.wall_s for u in rows["skopeo"])
    ref2 = statistics.median(u.wall_s for u in rows["skopeo-2nd"])
    table = []
    for name, label in (
        ("blobchain", "blobchain push, from the layout"),
        ("blobchain-s3", "blobchain push, streamed from S3"),
        ("skopeo", "skopeo copy oci: -> docker://"),
        ("blobchain-2nd", "blobchain push again (all HEAD hits)"),
        ("api-2nd", "push_layout again, in-process (no interpreter start)"),
        ("skopeo-2nd", "skopeo copy again"),
    ):
        us = rows[name]
        wall = statistics.median(u.wall_s for u in us)
        base = ref2 if name.endswith("2nd") else ref
        table.append(
            [
                label,
                f"{wall:.2f}",
                " / ".join(f"{u.wall_s:.2f}" for u in us),
                f"{statistics.median(u.cpu_s for u in us):.2f}",
                f"{total / (1 << 20) / wall:.0f}" if not name.endswith("2nd") else "–",
                f"{base / wall:.2f}x",
                f"{max(u.others_cpu_s for u in us):.1f}",
            ]
        )
    print(md_table(header, table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
