"""The image config builder: parsing, merging, history, created, determinism (pure, fast)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blobchain.layers.imageconfig import (
    CREATED_ANNOTATION,
    ConfigLayer,
    ImageOptions,
    InvalidImageOption,
    Platform,
    host_platform,
    image_config,
    manifest_annotations,
    parse_command,
    parse_created,
    parse_fragment,
    parse_port,
)
from blobchain.layers.oci import canonical_json
from blobchain.layers.records import EMPTY_LAYER_DIFF_ID

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def test_platform_parse_and_default():
    assert Platform.parse("linux/arm64/v8") == Platform("linux", "arm64", "v8")
    assert Platform.parse("linux/x86_64") == Platform("linux", "amd64")
    assert str(Platform.parse("linux/arm/v7")) == "linux/arm/v7"
    for bad in ("linux", "linux/", "a/b/c/d", "Linux/AMD64 x"):
        with pytest.raises(InvalidImageOption):
            Platform.parse(bad)
    cfg = image_config([ConfigLayer(D1, "/s/0")], ImageOptions())
    assert cfg["architecture"] == host_platform().architecture and cfg["os"] == "linux"


def test_command_forms():
    assert parse_command('["/bin/app", "--serve"]') == ("/bin/app", "--serve")
    assert parse_command("echo hi && sleep 1") == ("/bin/sh", "-c", "echo hi && sleep 1")
    assert parse_command("[]") == ()
    for bad in ("[1, 2]", '["a"', '[{"a": 1}]', "  "):
        with pytest.raises(InvalidImageOption):
            parse_command(bad)


def test_ports_and_created():
    assert parse_port("80") == "80/tcp"
    assert parse_port("53/UDP") == "53/udp"
    for bad in ("0", "70000", "80/icmp", "http"):
        with pytest.raises(InvalidImageOption):
            parse_port(bad)
    assert parse_created("@0") == "1970-01-01T00:00:00Z"
    assert parse_created("2024-01-02T05:04:05+02:00") == "2024-01-02T03:04:05Z"
    assert parse_created("2024-01-02T03:04:05.120Z") == "2024-01-02T03:04:05.12Z"
    now = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_created("now", now=now) == "2025-06-01T12:00:00Z"
    for bad in ("yesterday", "@-1", "@x", "2024-01-02", "2024-13-02T00:00:00Z"):
        with pytest.raises(InvalidImageOption):
            parse_created(bad)


def test_flags_override_the_fragment():
    frag = {
        "architecture": "arm64",
        "variant": "v8",
        "os": "linux",
        "author": "someone",
        "config": {
            "Env": ["PATH=/usr/bin", "A=1"],
            "Cmd": ["/old"],
            "Labels": {"x": "1", "y": "2"},
            "ExposedPorts": {"80/tcp": {}},
            "User": "nobody",
        },
    }
    opts = ImageOptions(
        cmd=("/new",),
        entrypoint=("/bin/tini", "--"),
        env=("A=2", "B=3"),
        labels=(("y", "two"),),
        exposed_ports=("443",),
        workdir="/app",
        stop_signal="SIGINT",
        fragment=frag,
    )
    cfg = image_config([ConfigLayer(D1, "/s/0")], opts)
    c = cfg["config"]
    assert c["Env"] == ["PATH=/usr/bin", "A=2", "B=3"]
    assert c["Cmd"] == ["/new"] and c["Entrypoint"] == ["/bin/tini", "--"]
    assert c["Labels"] == {"x": "1", "y": "two"}
    assert c["ExposedPorts"] == {"80/tcp": {}, "443/tcp": {}}
    assert c["User"] == "nobody" and c["WorkingDir"] == "/app" and c["StopSignal"] == "SIGINT"
    assert (cfg["architecture"], cfg["variant"], cfg["author"]) == ("arm64", "v8", "someone")
    # --platform beats the fragment's
    cfg = image_config(
        [ConfigLayer(D1, "/s/0")], ImageOptions(platform=Platform("linux", "s390x"), fragment=frag)
    )
    assert cfg["architecture"] == "s390x" and "variant" not in cfg
    # a bare execution config is accepted too, and '[]' clears
    cfg = image_config([ConfigLayer(D1, "x")], ImageOptions(cmd=(), fragment={"Cmd": ["a"], "Env": ["K=V"]}))
    assert "Cmd" not in cfg["config"] and cfg["config"]["Env"] == ["K=V"]


def test_fragment_rejects_what_the_chain_owns():
    for bad in ({"rootfs": {}}, {"history": []}, {"config": {"Nope": 1}}, {"config": {"Cmd": "x"}}, [1]):
        with pytest.raises(InvalidImageOption):
            parse_fragment(bad)
    with pytest.raises(InvalidImageOption):
        ImageOptions(env=("NOEQUALS",))
    with pytest.raises(InvalidImageOption):
        ImageOptions(stop_signal="kill it")


def test_history_and_empty_layers():
    layers = [
        ConfigLayer(D1, "/s/base"),
        ConfigLayer(EMPTY_LAYER_DIFF_ID, "/s/noop"),
        ConfigLayer(D2, "apt install"),
    ]
    cfg = image_config(layers, ImageOptions())
    assert cfg["rootfs"] == {"type": "layers", "diff_ids": [D1, D2]}
    assert cfg["history"] == [
        {"created_by": "/s/base"},
        {"created_by": "/s/noop", "empty_layer": True},
        {"created_by": "apt install"},
    ]
    assert "created" not in cfg
    # the non-empty history entries match the layers one to one (image-spec)
    assert sum(not h.get("empty_layer") for h in cfg["history"]) == len(cfg["rootfs"]["diff_ids"])


def test_created_from_source_date_epoch_unless_explicit():
    opts = ImageOptions().with_created_epoch(1700000000)
    cfg = image_config([ConfigLayer(D1, "x")], opts)
    assert cfg["created"] == "2023-11-14T22:13:20Z"
    assert cfg["history"][0]["created"] == cfg["created"]
    assert manifest_annotations(opts) == {CREATED_ANNOTATION: "2023-11-14T22:13:20Z"}
    explicit = ImageOptions(created="@5").with_created_epoch(1700000000)
    assert explicit.created == "1970-01-01T00:00:05Z"
    assert manifest_annotations(ImageOptions(annotations=(("a", "b"),))) == {"a": "b"}


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)


@given(
    env=st.lists(st.tuples(st.from_regex(r"[A-Z_]{1,6}", fullmatch=True), _text), max_size=5),
    labels=st.dictionaries(_text.filter(bool), _text, max_size=4),
    cmd=st.lists(_text, max_size=3),
)
def test_same_inputs_same_bytes(env, labels, cmd):
    def build() -> bytes:
        opts = ImageOptions(
            env=tuple(f"{k}={v}" for k, v in env),
            labels=tuple(labels.items()),
            cmd=tuple(cmd),
            platform=Platform("linux", "amd64"),
        )
        return canonical_json(image_config([ConfigLayer(D1, "/a"), ConfigLayer(D2, "/b")], opts))

    assert build() == build()
