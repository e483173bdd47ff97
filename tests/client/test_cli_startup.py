"""Start-up of ``blobchain export`` (issue 7): a tiny chain is built in the CLI's own process (no
build process spawned, whether it builds every layer, one, or none), and the embedded CLI never
imports the distributed stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Runs the CLI in a fresh interpreter and reports, after it returns, whether the process pool's
# spawn machinery was ever imported (it is imported when the first build process starts).
_PROBE = """
import json, sys
from blobchain.client.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "spawned": "multiprocessing.popen_spawn_posix" in sys.modules,
                  "distributed": sorted(m for m in ("celery", "kombu", "boto3", "botocore", "redis")
                                        if m in sys.modules),
                  "heavy": sorted(m for m in ("pydantic", "pydantic_settings", "tenacity", "asyncio",
                                              "rich")
                                  if m in sys.modules)}))
"""


def _export(*args: str) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BLOBCHAIN_")}
    r = subprocess.run(
        [sys.executable, "-c", _PROBE, "export", *args, "-q", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    *result, probe = r.stdout.strip().splitlines()
    out = json.loads(probe)
    out["result"] = json.loads("\n".join(result))
    return out


def _chain(tmp_path: Path) -> list[str]:
    s0, s1 = tmp_path / "s0", tmp_path / "s1"
    s0.mkdir()
    s1.mkdir()
    (s0 / "a.txt").write_text("hello\n")
    (s1 / "a.txt").write_text("hello\n")
    (s1 / "b.txt").write_text("world\n")
    return [str(s0), str(s1)]


@pytest.mark.parametrize("compression", ["gzip", "zstd", "uncompressed"])
def test_a_tiny_two_layer_export_starts_no_build_process(tmp_path: Path, compression: str) -> None:
    snaps = _chain(tmp_path)
    oci = str(tmp_path / "oci")
    both = _export(*snaps, "--oci", oci, "-c", compression)  # both layers to build
    assert both["rc"] == 0 and both["spawned"] is False and both["distributed"] == []
    # What start-up no longer loads when nothing needs it: pydantic and pydantic-settings with
    # nothing configured (typer 0.28, pinned in pyproject.toml, coerces without pydantic),
    # tenacity (and the asyncio it loads) without a ref held elsewhere, rich at all with -q and
    # --json into a pipe (its JSON is written plainly there, the same text).
    assert both["heavy"] == []
    again = _export(*snaps, "--oci", oci, "-c", compression)  # everything built
    assert again["spawned"] is False
    assert again["result"] == both["result"]
    # One layer to build: the first is in the store already.
    other = str(tmp_path / "other")
    first = _export(snaps[0], "--oci", other, "-c", compression)
    one = _export(*snaps, "--oci", other, "-c", compression)
    assert first["spawned"] is False and one["spawned"] is False
    assert one["result"]["layers"] == both["result"]["layers"]  # type: ignore[index]
    assert one["result"]["manifest"] == both["result"]["manifest"]  # type: ignore[index]


def test_json_into_a_pipe_is_what_rich_prints(capsys: pytest.CaptureFixture[str]) -> None:
    """The plain JSON written without rich is byte for byte rich's ``print_json`` off a terminal
    (non-ASCII, nesting, empty containers, escapes), so scripts parsing ``--json`` see no change."""
    import io

    from rich.console import Console

    from blobchain.client import cli

    data = {"a": "ü ☃ " + "x" * 200, "n": [1, 2.5, None, True], "nested": {"k": "v\ttab\n"}, "e": {}, "l": []}
    cli._print_json(data)
    buf = io.StringIO()
    Console(file=buf).print_json(json.dumps(data))
    assert capsys.readouterr().out == buf.getvalue()
