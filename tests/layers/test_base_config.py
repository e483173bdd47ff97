"""Pure parts of ``--base``: the config inherited from a base (as Dockerfile's FROM), the base's
refs and their chain IDs."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from blobchain.client.base import base_ref_id, base_specs
from blobchain.client.image import ImageLayer, ResolvedImage
from blobchain.layers.identity import chain_ids, next_ids
from blobchain.layers.imageconfig import ConfigLayer, ImageOptions, Platform, image_config
from blobchain.layers.records import EMPTY_LAYER_DIFF_ID, Descriptor

digests = st.binary(min_size=1, max_size=8).map(lambda b: "sha256:" + hashlib.sha256(b).hexdigest())

BASE = {
    "architecture": "arm64",
    "variant": "v8",
    "os": "linux",
    "config": {
        "Env": ["PATH=/usr/bin", "A=1"],
        "Entrypoint": ["/init"],
        "Cmd": ["--serve"],
        "WorkingDir": "/srv",
        "User": "app",
        "Labels": {"a": "1", "b": "2"},
        "ExposedPorts": {"80/tcp": {}},
        "StopSignal": "SIGINT",
    },
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "1" * 64, "sha256:" + "2" * 64]},
    "history": [
        {"created_by": "one"},
        {"created_by": "ENV x", "empty_layer": True},
        {"created_by": "two"},
    ],
}


def _cfg(opts: ImageOptions, layers: list[ConfigLayer] | None = None) -> dict:
    return image_config(layers or [ConfigLayer("sha256:" + "3" * 64, "ours")], opts)


def test_everything_is_inherited_when_nothing_is_set() -> None:
    cfg = _cfg(ImageOptions(base_config=BASE))
    assert cfg["config"] == BASE["config"]
    assert (cfg["architecture"], cfg["variant"], cfg["os"]) == ("arm64", "v8", "linux")
    assert cfg["rootfs"]["diff_ids"] == [*BASE["rootfs"]["diff_ids"], "sha256:" + "3" * 64]
    assert cfg["history"] == [*BASE["history"], {"created_by": "ours"}]
    assert "created" not in cfg  # the base's created time is not ours


def test_explicit_options_override_the_base() -> None:
    opts = ImageOptions(
        base_config=BASE,
        env=("A=2", "C=3"),
        cmd=("run",),
        workdir="/app",
        user="root",
        labels=(("b", "x"),),
        exposed_ports=("53/udp",),
        platform=Platform("linux", "amd64"),
    )
    c = _cfg(opts)
    assert c["config"]["Env"] == ["PATH=/usr/bin", "A=2", "C=3"]
    assert c["config"]["Entrypoint"] == ["/init"] and c["config"]["Cmd"] == ["run"]
    assert (c["config"]["WorkingDir"], c["config"]["User"]) == ("/app", "root")
    assert c["config"]["Labels"] == {"a": "1", "b": "x"}
    assert c["config"]["ExposedPorts"] == {"80/tcp": {}, "53/udp": {}}
    assert (c["architecture"], c.get("variant")) == ("amd64", None)


def test_an_entrypoint_drops_the_inherited_cmd_as_buildkit_does() -> None:
    c = _cfg(ImageOptions(base_config=BASE, entrypoint=("/other",)))
    assert c["config"]["Entrypoint"] == ["/other"] and "Cmd" not in c["config"]
    both = _cfg(ImageOptions(base_config=BASE, entrypoint=("/other",), cmd=("x",)))
    assert both["config"]["Cmd"] == ["x"]
    # from a --config fragment too
    frag = _cfg(ImageOptions(base_config=BASE, fragment={"Entrypoint": ["/f"]}))
    assert frag["config"]["Entrypoint"] == ["/f"] and "Cmd" not in frag["config"]


def test_fragment_merges_over_the_base_and_flags_over_the_fragment() -> None:
    opts = ImageOptions(base_config=BASE, fragment={"Env": ["A=frag"], "Labels": {"c": "3"}}, env=("A=flag",))
    c = _cfg(opts)
    assert c["config"]["Env"] == ["PATH=/usr/bin", "A=flag"]
    assert c["config"]["Labels"] == {"a": "1", "b": "2", "c": "3"}


def test_a_base_without_matching_history_gets_one_entry_per_layer() -> None:
    base = {**BASE, "history": [{"created_by": "only one"}]}
    cfg = _cfg(ImageOptions(base_config=base))
    assert [h.get("created_by") for h in cfg["history"]] == ["base layer 0", "base layer 1", "ours"]


@given(st.lists(digests, min_size=1, max_size=6), st.lists(digests, max_size=4), st.integers(0, 3))
def test_rootfs_and_history_pair_up(base_ids: list[str], ours: list[str], empties: int) -> None:
    base = {
        "rootfs": {"diff_ids": base_ids},
        "history": [{"created_by": f"b{i}"} for i in range(len(base_ids))],
    }
    layers = [ConfigLayer(d, f"o{i}") for i, d in enumerate(ours)] + [
        ConfigLayer(EMPTY_LAYER_DIFF_ID, "empty")
    ] * empties
    cfg = image_config(layers, ImageOptions(base_config=base))
    assert cfg["rootfs"]["diff_ids"] == base_ids + ours
    non_empty = [h for h in cfg["history"] if not h.get("empty_layer")]
    assert len(non_empty) == len(cfg["rootfs"]["diff_ids"])


def _image(diff_ids: list[str]) -> ResolvedImage:
    layers = tuple(
        ImageLayer(Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", d, 1), d) for d in diff_ids
    )
    cfg = Descriptor("application/vnd.oci.image.config.v1+json", "sha256:" + "c" * 64, 2)
    return ResolvedImage("x", cfg, cfg, {}, layers)


@given(st.lists(digests, min_size=1, max_size=8))
def test_base_specs_are_a_chain_keyed_by_chain_ids(diff_ids: list[str]) -> None:
    img = _image(diff_ids)
    specs = base_specs(img, "/top", "/cache")
    assert [s.parent for s in specs] == [None, *[s.ref_id for s in specs[:-1]]]
    assert specs[-1].snapshot == "/top"
    ids = chain_ids(diff_ids)
    assert img.chain_ids == ids and img.top_chain_id == ids[-1]
    blob_ids = []
    pair = None
    for d in diff_ids:
        pair = next_ids(pair, d, d)
        blob_ids.append(pair[1])
    for s, cid, bid in zip(specs[:-1], ids, blob_ids, strict=False):
        assert s.snapshot == f"/cache/{cid[7:]}" and s.ref_id == base_ref_id(cid, bid, s.snapshot)
    # deterministic: the same base gives the same refs
    assert base_specs(img, "/top", "/cache") == specs
    # and chain IDs computed ref by ref (BuildKit's computeChainMetadata) equal identity.ChainID
    pair = None
    for d, want in zip(diff_ids, ids, strict=True):
        pair = next_ids(pair, d, d)
        assert pair[0] == want
