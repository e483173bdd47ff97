"""``blobchain.layers`` loads its public names on first use: importing ``blobchain.layers.errors``
(every module does) does not import the engine, and every public name still resolves."""

from __future__ import annotations

import subprocess
import sys

import blobchain.layers as layers


def test_every_public_name_resolves_to_its_module() -> None:
    from blobchain.layers import layer, records, snapshot

    for name in layers.__all__:
        assert getattr(layers, name) is not None, name
    assert layers.write_layer is layer.write_layer
    assert layers.RefSpec is records.RefSpec
    assert layers.open_snapshot is snapshot.open_snapshot


def test_an_unknown_name_is_an_attribute_error_and_submodules_still_import() -> None:
    try:
        layers.no_such_thing  # noqa: B018
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:  # pragma: no cover
        raise AssertionError("no AttributeError")
    from blobchain.layers import native

    assert native.__name__ == "blobchain.layers.native"


def test_importing_the_errors_does_not_load_the_engine() -> None:
    code = "import sys, blobchain.layers.errors; print('blobchain.layers.layer' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
