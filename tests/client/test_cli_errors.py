"""Issue 6 part B, defects 7 and 8: every bad input on the command line is a one-line named
error with the exit code README's table documents, and changes nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from blobchain.client.cli import _EXIT, app, main
from blobchain.client.sample import make_sample_chain
from blobchain.layers import errors

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture
def chain(tmp_path: Path) -> list[str]:
    return make_sample_chain(str(tmp_path / "snaps"))


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(list(args))
    return rc, capsys.readouterr().err


def _one_line(err: str, code: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error ({code}): "), err
    return lines[0]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--level", "abc"], "--level"),
        (["--jobs", "x"], "--jobs"),
        (["--bogus"], "--bogus"),
        (["--jobs", "-1"], "--jobs"),
        (["--jobs", "0"], "--jobs"),
        (["--jobs", str(10**12)], "--jobs"),
        (["--source-date-epoch", "999999999999"], "--source-date-epoch"),
        (["--source-date-epoch", str(2**63)], "--source-date-epoch"),
        (["--source-date-epoch", "-1"], "--source-date-epoch"),
        (["--compression"], "--compression"),
    ],
)
def test_usage_errors_are_one_line_with_exit_2(tmp_path, chain, capsys, args, needle) -> None:
    out = tmp_path / "oci"
    rc, err = _cli(capsys, "export", *chain, "--oci", str(out), "-q", *args)
    assert rc == 2, err
    assert needle in _one_line(err, "usage_error")
    assert not out.exists()


def test_a_missing_oci_and_a_bad_env_epoch(tmp_path, chain, capsys, monkeypatch) -> None:
    rc, err = _cli(capsys, "export", *chain, "-q")
    assert rc == 2
    assert "--oci" in _one_line(err, "usage_error")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "abc")
    rc, err = _cli(capsys, "export", *chain, "--oci", str(tmp_path / "oci"), "-q")
    assert rc == 2
    assert "SOURCE_DATE_EPOCH" in _one_line(err, "usage_error")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "999999999999")
    rc, err = _cli(capsys, "export", *chain, "--oci", str(tmp_path / "oci"), "-q")
    assert rc == 2
    assert not (tmp_path / "oci").exists()  # before: 2 blobs committed, then "year 33658"


def test_the_largest_epoch_exports(tmp_path, chain, capsys) -> None:
    from blobchain.layers.records import MAX_SOURCE_DATE_EPOCH

    out = tmp_path / "oci"
    rc, err = _cli(
        capsys, "export", *chain, "--oci", str(out), "-q", "--source-date-epoch", str(MAX_SOURCE_DATE_EPOCH)
    )
    assert rc == 0, err
    index = json.loads((out / "index.json").read_bytes())
    manifest = json.loads((out / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_bytes())
    config = json.loads((out / "blobs" / "sha256" / manifest["config"]["digest"][7:]).read_bytes())
    assert config["created"].startswith("9999-12-31T23:59:59")


@pytest.mark.parametrize("value", ["0", "-3", "abc", "100000"])
def test_bad_jobs_setting(tmp_path, chain, capsys, monkeypatch, value) -> None:
    monkeypatch.setenv("BLOBCHAIN_JOBS", value)
    rc, err = _cli(capsys, "export", *chain, "--oci", str(tmp_path / "oci"), "-q")
    assert rc == 2, err
    assert "BLOBCHAIN_JOBS" in _one_line(err, "invalid_setting")  # before: a raw ValidationError
    assert not (tmp_path / "oci").exists()


@pytest.mark.parametrize(
    "url",
    [
        "redis://:hunter2@redis:99999/0",  # port out of range
        "redis://:hunter2@redis:port/0",  # not a port
        "http://:hunter2@redis:6379/0",  # not a Redis scheme
        "redis://:hunter2@[::1/0",  # bad IPv6
        "redis://:hunter2@redis:6379/zero",  # not a database number
        "redis://:hunter2@:6379/0",  # no host
    ],
)
def test_malformed_broker_url(tmp_path, chain, capsys, monkeypatch, url) -> None:
    monkeypatch.setenv("BLOBCHAIN_BROKER_URL", url)
    for args in (
        ["status", "r-x"],
        ["submit", *chain, "-q"],
        ["export", *chain, "--oci", str(tmp_path / "o"), "-q"],
    ):
        rc, err = _cli(capsys, *args)
        assert rc == 2, err
        line = _one_line(err, "invalid_setting")
        assert "BLOBCHAIN_BROKER_URL" in line
        assert "hunter2" not in err
    assert not (tmp_path / "o").exists()


def _deep_tree(root: Path, total: int) -> bytes:
    """A file whose path below ``root`` is about ``total`` bytes (components of 200)."""
    rel = b""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        i = 0
        while len(rel) + 210 < total:
            name = b"d%03d" % i + b"x" * 196
            os.mkdir(name, dir_fd=fd)
            nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
            rel += name + b"/"
            i += 1
        leaf = b"f" * max(1, min(200, total - len(rel)))
        ffd = os.open(leaf, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(ffd, b"deep")
        os.close(ffd)
        return rel + leaf
    finally:
        os.close(fd)


def test_a_path_beyond_path_max_from_the_root_but_not_from_the_snapshot(tmp_path, capsys) -> None:
    snap = tmp_path / "snap"
    snap.mkdir()
    rel = _deep_tree(snap, 4090)
    assert len(rel) < 4096 < len(os.fsencode(snap)) + 1 + len(rel)  # only the absolute path is too long
    out = tmp_path / "oci"
    rc, err = _cli(capsys, "export", str(snap), "--oci", str(out), "-q", "--compression", "uncompressed")
    assert rc == 0, err  # before: OSError ENAMETOOLONG from _getxattr (an absolute-path lookup)
    blob = next(p for p in (out / "blobs" / "sha256").iterdir() if p.stat().st_size > 10000)
    assert rel in blob.read_bytes()  # the PAX path record holds it


def test_a_path_beyond_path_max_in_the_snapshot(tmp_path, capsys) -> None:
    snap = tmp_path / "snap"
    snap.mkdir()
    _deep_tree(snap, 4400)
    out = tmp_path / "oci"
    rc, err = _cli(capsys, "export", str(snap), "--oci", str(out), "-q")
    assert rc == 2, err
    _one_line(err, "path_too_long")
    assert not out.exists()


def test_the_console_script_exits_with_the_code(tmp_path) -> None:
    """Through the installed entry point, as a user runs it (not only main())."""
    exe = Path(sys.executable).with_name("blobchain")
    for args, code in (
        (["export", "x", "--bogus"], 2),
        (["status", "r-x", "--oci", str(tmp_path / "none")], 3),
    ):
        res = subprocess.run([str(exe), *args], capture_output=True, text=True)
        assert res.returncode == code, res.stderr
        assert "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def _every_class() -> list[type[errors.BlobchainError]]:
    """Every error class defined so far, registered or not (a CLI-only error need not be)."""
    out, stack = [], [errors.BlobchainError]
    while stack:
        cls = stack.pop()
        out.append(cls)
        stack.extend(cls.__subclasses__())
    return out


def test_readme_lists_every_exit_code_and_error_code() -> None:
    # every module that defines an error class, so the walk below sees them all
    import blobchain.client.image
    import blobchain.layers.apply
    import blobchain.layers.imageconfig
    import blobchain.layers.overlay
    import blobchain.registry.errors
    import blobchain.storage.claims.redis
    import blobchain.storage.content.s3
    import blobchain.storage.redis_util
    import blobchain.tasks.layer_tasks  # noqa: F401

    text = README.read_text()
    table = text[text.index("| exit |") :]
    table = table[: table.index("\n\n")]
    rows = {int(m.group(1)): m.group(2) for m in re.finditer(r"^\| (\d+) \|(.*)\|$", table, re.M)}
    assert set(rows) >= {code for _, code in _EXIT} | {1, 130}
    documented = set(re.findall(r"`([a-z0-9_]+)`", table))
    # the two bases no code raises as such (every raised error is one of their subclasses)
    bases = {"blobchain", "registry_error"}
    every = {cls.code for cls in _every_class()} - bases
    assert every <= documented, every - documented
    # each code sits in the row of the exit code it really gets
    from blobchain.client.cli import _exit_code

    for cls in _every_class():
        if cls.code in bases:
            continue
        err = cls.__new__(cls)
        errors.BlobchainError.__init__(err, "x")
        row = rows[_exit_code(err)]
        assert f"`{cls.code}`" in row, (cls.code, row)


@pytest.mark.parametrize("command", [None, *sorted(typer.main.get_group(app).commands)])
def test_every_help_page_renders(capsys: pytest.CaptureFixture[str], command: str | None) -> None:
    """Help text is plain text, not rich markup: ``os/arch[/variant]`` once crashed ``export --help``."""
    rc = main([*([command] if command else []), "--help"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "Usage:" in text
