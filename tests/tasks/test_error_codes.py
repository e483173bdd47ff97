"""Every error code round-trips (pickle for the process pool, RefFailed for Celery), and the
codes are registered explicitly: importing the catalogue (``tasks.errors``) alone, in a fresh
interpreter, makes every documented code rebuildable as its own class."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

import blobchain.tasks.errors  # the catalogue: registers every code
from blobchain.layers.errors import BlobchainError, DigestMismatch, register, registered_codes
from blobchain.tasks.errors import RefFailed

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize("code", sorted(registered_codes()))
def test_every_code_round_trips(code: str) -> None:
    cls = registered_codes()[code]
    err = blobchain.layers.errors.from_code(code, "it broke", {"ref": "r1", "n": 3})
    assert type(err) is cls and err.code == code and err.message == "it broke"
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls and back.details == {"ref": "r1", "n": 3}
    # through the result backend: JSON only
    sent = json.loads(json.dumps(RefFailed.of(err).args))
    rebuilt = RefFailed(*sent).error()
    assert type(rebuilt) is cls and rebuilt.message == "it broke" and rebuilt.details == {"ref": "r1", "n": 3}


def test_digest_mismatch_keeps_its_fields() -> None:
    err = DigestMismatch("bad", expected="sha256:a", got="sha256:b")
    back = RefFailed(*json.loads(json.dumps(RefFailed.of(err).args))).error()
    assert isinstance(back, DigestMismatch) and (back.expected, back.got) == ("sha256:a", "sha256:b")


def test_a_code_is_taken_once() -> None:
    with pytest.raises(TypeError, match="taken"):

        @register
        class Again(BlobchainError):
            code = "poison_ref"


def test_the_catalogue_alone_registers_every_documented_code() -> None:
    table = README.read_text()
    table = table[table.index("| exit |") :]
    documented = set(re.findall(r"`([a-z0-9_]+)`", table[: table.index("\n\n")]))
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import blobchain.tasks.errors\n"
            "from blobchain.layers.errors import registered_codes\n"
            "print(' '.join(sorted(registered_codes())))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    known = set(out.stdout.split())
    # Raised in the CLI's own process only (unpack and image reading): no worker sends them.
    cli_only = {"invalid_layer", "image_not_found", "invalid_image", "invalid_image_reference", "target_not_empty"}
    assert documented - known <= cli_only, documented - known - cli_only
