"""Bad input through ``blobchain export`` as a user meets it: the real CLI in a subprocess.

Each case must end with a one-line named error and the documented exit code (README: 4 failed
precondition, 5 unavailable, 130 interrupted), never a traceback; nothing partial may be
visible (every object under ``blobs/`` matches its name, no tag points at a half-built image);
and the next run must work, reusing what was finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import fsgen
import pytest
import services

pytestmark = services.needs_root("tmpfs mounts")

BLOBCHAIN = str(Path(sys.executable).parent / "blobchain")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("BLOBCHAIN_")}


def run_export(snapshots: list[Path], out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [BLOBCHAIN, "export", *map(str, snapshots), "--oci", str(out), "-q", *args]
    return subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=300)


def start_export(snapshots: list[Path], out: Path, *args: str) -> subprocess.Popen[str]:
    argv = [BLOBCHAIN, "export", *map(str, snapshots), "--oci", str(out), "-q", *args]
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True
    )


def assert_named_error(rc: int, stderr: str, code: str, exit_code: int) -> None:
    """The named error alone on stderr (rich may wrap a long one at the console width)."""
    assert "Traceback" not in stderr, stderr
    assert stderr.lstrip().startswith(f"error ({code}):"), stderr
    assert stderr.count("error (") == 1, stderr
    assert rc == exit_code, (rc, stderr)


def blobs(layout: Path) -> dict[str, int]:
    """Every object under blobs/sha256: its name -> inode; each must match its name."""
    out: dict[str, int] = {}
    d = layout / "blobs" / "sha256"
    if not d.exists():
        return out
    for p in d.iterdir():
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        assert h.hexdigest() == p.name, f"{p} does not match its name"
        out[p.name] = p.stat().st_ino
    return out


def tags(layout: Path) -> list[str]:
    try:
        index = json.loads((layout / "index.json").read_text())
    except FileNotFoundError:
        return []
    return [m.get("annotations", {}).get("org.opencontainers.image.ref.name") for m in index["manifests"]]


def layer_digests(layout: Path, tag: str = "latest") -> list[str]:
    index = json.loads((layout / "index.json").read_text())
    (m,) = [m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag]
    manifest = json.loads((layout / "blobs" / "sha256" / m["digest"][7:]).read_bytes())
    return [layer["digest"][7:] for layer in manifest["layers"]]


def random_file(path: Path, size: int, seed: int = 0) -> None:
    """Incompressible bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(rng.randbytes(1 << 20))


_SIXTEEN = bytes.maketrans(bytes(range(256)), b"abcdefghijklmnop" * 16)


def text_file(path: Path, size: int, seed: int = 0) -> None:
    """Compressible but slow to compress (4 bits a byte): gzip -9 takes seconds over a few tens of
    MiB and writes its output as it goes, so the layer is visibly being written for a while."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(rng.randbytes(1 << 20).translate(_SIXTEEN))


def wait_for(cond: Callable[[], bool], proc: subprocess.Popen[str], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError(f"export ended ({proc.returncode}) before {what}: {proc.communicate()[1]}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def ingesting(out: Path, at_least: int = 1) -> Callable[[], bool]:
    """True once an ingest in the store holds ``at_least`` bytes of a layer being written."""
    ingest = out / ".blobchain" / "ingest"

    def check() -> bool:
        try:
            return any(p.stat().st_size >= at_least for p in ingest.rglob("*") if p.is_file())
        except FileNotFoundError:
            return False

    return check


# --- a full disk ------------------------------------------------------------------------------


def test_full_disk_is_store_full_and_changes_nothing(tmp_path: Path) -> None:
    base = fsgen.build(tmp_path / "s0", {b"etc/hostname": fsgen.File(b"base\n")})
    big = fsgen.build(tmp_path / "s1", {b"etc/hostname": fsgen.File(b"big\n")})
    random_file(big / "data.bin", 24 << 20)  # incompressible: a 24 MiB blob into 8 MiB
    with services.tmpfs(tmp_path / "small", "8m") as mnt:
        out = mnt / "oci"
        r = run_export([base, big], out)
        assert_named_error(r.returncode, r.stderr, "store_full", 5)
        assert "latest" not in tags(out)
        blobs(out)  # whatever was kept is whole
        leftovers = [p for p in (out / ".blobchain" / "ingest").rglob("*") if p.is_file()]
        assert leftovers == [], leftovers  # the space a failed ingest took is given back
        # The store still works: a chain that fits goes in, and reuses the base layer.
        small = fsgen.build(tmp_path / "s2", {b"etc/hostname": fsgen.File(b"small\n")})
        r = run_export([base, small], out)
        assert r.returncode == 0, r.stderr
        assert tags(out) == ["latest"]
        assert set(layer_digests(out)) <= set(blobs(out))


# --- a file that vanishes in the middle of the walk ---------------------------------------------


# A file listed with the big one (its directory was read, the file not yet), and a directory
# listed at the root: both vanish once the walk is inside aa/big.txt.
@pytest.mark.parametrize("victim", ["aa/zz-victim", "zz"])
def test_file_vanishing_mid_walk_is_file_changed(tmp_path: Path, victim: str) -> None:
    base = fsgen.build(tmp_path / "s0", {b"etc/hostname": fsgen.File(b"base\n")})
    files = {b"etc/hostname": fsgen.File(b"x\n"), b"aa/zz-victim": fsgen.File(b"v" * 10), b"zz/f": fsgen.File(b"f")}
    snap = fsgen.build(tmp_path / "s1", files)
    text_file(snap / "aa" / "big.txt", 32 << 20)  # walked (and compressed, slowly) before both
    out = tmp_path / "oci"
    args = ("-c", "gzip", "--level", "9")
    proc = start_export([base, snap], out, *args)
    # Some MiB into the big layer (not the base's tiny ingest): the walk is inside aa/ now.
    wait_for(ingesting(out, 4 << 20), proc, "the big layer to be written")
    target = snap / victim
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    _, stderr = proc.communicate(timeout=300)
    assert_named_error(proc.returncode, stderr, "file_changed", 4)
    assert victim in stderr  # names what vanished
    assert "latest" not in tags(out)
    before = blobs(out)
    # Put it back: the rerun completes, reusing the base layer's blob.
    fsgen.build(tmp_path / "again", files)
    for name in ("aa/zz-victim", "zz"):
        if not (snap / name).exists():
            os.rename(tmp_path / "again" / name, snap / name)
    r = run_export([base, snap], out, *args)
    assert r.returncode == 0, r.stderr
    after = blobs(out)
    assert all(after[name] == ino for name, ino in before.items())
    assert set(layer_digests(out)) <= set(after)


# --- Ctrl-C, then run again ---------------------------------------------------------------------


def test_ctrl_c_on_a_chain_then_rerun_reuses_the_finished_layers(tmp_path: Path) -> None:
    specs = fsgen.chain()[:3]
    states = [fsgen.build(tmp_path / f"s{i}", spec) for i, spec in enumerate(specs)]
    top = fsgen.build(tmp_path / "top", specs[2])
    text_file(top / "data.txt", 32 << 20)  # slow at gzip -9: the export is interrupted here
    chain = [*states, top]
    out = tmp_path / "oci"
    args = ("-c", "gzip", "--level", "9")
    proc = start_export(chain, out, *args)
    # Layers build in parallel: wait for the three small ones to be committed and the big one
    # to be mid-ingest.
    wait_for(lambda: len(blobs_quiet(out)) >= 3 and ingesting(out)(), proc, "three layers done, one running")
    finished = blobs(out)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    assert "latest" not in tags(out)
    assert blobs(out) == finished  # the finished layers stay; nothing partial was added
    # If a finished layer were rebuilt, these edits would change its bytes (and so its digest).
    for state in states:
        (state / "etc" / "hostname").write_bytes(b"edited after the interrupt\n")
    r = run_export(chain, out, *args)
    assert r.returncode == 0, r.stderr
    digests = layer_digests(out)
    assert set(digests[:3]) <= set(finished), "a finished layer was rebuilt"
    after = blobs(out)
    assert all(after[name] == ino for name, ino in finished.items())  # the same files, untouched
    assert digests[3] in after and digests[3] not in finished


def blobs_quiet(layout: Path) -> list[str]:
    d = layout / "blobs" / "sha256"
    try:
        return [p.name for p in d.iterdir()]
    except FileNotFoundError:
        return []

