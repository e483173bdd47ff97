"""The image config end to end: export/submit options -> config, history, annotations, index;
checked by reading the layout and by skopeo and umoci (the runtime config they derive)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from services import require_tool

from blobchain.client import Client, ImageOptions, Platform
from blobchain.client.cli import main
from blobchain.client.sample import make_sample_chain
from blobchain.config.settings import Settings
from blobchain.layers.records import EMPTY_LAYER_DIFF_ID


@pytest.fixture
def chain(tmp_path):
    return make_sample_chain(str(tmp_path / "snaps"))


def _blob(layout, digest: str) -> dict:
    with open(os.path.join(layout, "blobs", "sha256", digest[7:]), "rb") as f:
        return json.load(f)


def _image(layout, tag: str) -> tuple[dict, dict, dict]:
    with open(os.path.join(layout, "index.json")) as f:
        index = json.load(f)
    entry = next(
        m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag
    )
    manifest = _blob(layout, entry["digest"])
    return entry, manifest, _blob(layout, manifest["config"]["digest"])


def _export(capsys, *args) -> dict:
    capsys.readouterr()
    rc = main(["export", *args, "--json", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads(captured.out)


IMAGE_FLAGS = [
    "--platform", "linux/arm64/v8",
    "--entrypoint", '["/bin/tini", "--"]',
    "--cmd", "exec /usr/bin/app --serve",
    "--env", "A=1", "--env", "PATH=/usr/local/bin:/usr/bin",
    "--workdir", "/srv",
    "--user", "1000:1000",
    "--label", "org.example.team=infra",
    "--expose", "8080", "--expose", "53/udp",
    "--stop-signal", "SIGQUIT",
    "--comment", "base system", "--comment", "add app",
    "--annotation", "org.opencontainers.image.source=https://example.invalid/repo",
]  # fmt: skip


def test_export_writes_the_runnable_config(tmp_path, chain, capsys):
    frag = tmp_path / "frag.json"
    frag.write_text(json.dumps({"config": {"Env": ["A=0", "FROM_FILE=yes"], "Labels": {"k": "v"}}}))
    out = str(tmp_path / "oci")
    data = _export(capsys, *chain, "--oci", out, "--tag", "t", "--config", str(frag), *IMAGE_FLAGS)
    _, manifest, cfg = _image(out, "t")
    assert manifest["config"]["digest"] and data["manifest"]
    assert (cfg["os"], cfg["architecture"], cfg["variant"]) == ("linux", "arm64", "v8")
    c = cfg["config"]
    assert c["Entrypoint"] == ["/bin/tini", "--"]
    assert c["Cmd"] == ["/bin/sh", "-c", "exec /usr/bin/app --serve"]
    assert c["Env"] == ["FROM_FILE=yes", "A=1", "PATH=/usr/local/bin:/usr/bin"]
    assert c["WorkingDir"] == "/srv" and c["User"] == "1000:1000" and c["StopSignal"] == "SIGQUIT"
    assert c["Labels"] == {"k": "v", "org.example.team": "infra"}
    assert c["ExposedPorts"] == {"8080/tcp": {}, "53/udp": {}}
    assert [h["created_by"] for h in cfg["history"]] == ["base system", "add app", chain[2]]
    assert "created" not in cfg and all("created" not in h for h in cfg["history"])
    assert manifest["annotations"] == {"org.opencontainers.image.source": "https://example.invalid/repo"}

    require_tool("umoci", "umoci")
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{out}:t", str(bundle)], check=True, capture_output=True)
    runtime = json.loads((bundle / "config.json").read_text())
    assert runtime["process"]["args"] == ["/bin/tini", "--", "/bin/sh", "-c", "exec /usr/bin/app --serve"]
    assert runtime["process"]["cwd"] == "/srv"
    assert "A=1" in runtime["process"]["env"]
    assert runtime["process"]["user"]["uid"] == 1000


def test_same_inputs_same_manifest_digest(tmp_path, chain, capsys):
    a = _export(
        capsys, *chain, "--oci", str(tmp_path / "a"), *IMAGE_FLAGS, "--source-date-epoch", "1700000000"
    )
    b = _export(
        capsys, *chain, "--oci", str(tmp_path / "b"), *IMAGE_FLAGS, "--source-date-epoch", "1700000000"
    )
    assert a["manifest"] == b["manifest"]
    # and through the Python client, with the same options spelled as ImageOptions
    with Client(Settings(store=str(tmp_path / "c")), in_process=True) as client:
        specs = client.register_chain(chain)
        with client.lease() as lease:
            res = client.compute_blob_chain(specs[-1].ref_id, lease=lease, source_date_epoch=1700000000).wait(
                60
            )
        opts = ImageOptions(
            platform=Platform.parse("linux/arm64/v8"),
            entrypoint=("/bin/tini", "--"),
            cmd=("/bin/sh", "-c", "exec /usr/bin/app --serve"),
            env=("A=1", "PATH=/usr/local/bin:/usr/bin"),
            workdir="/srv",
            user="1000:1000",
            labels=(("org.example.team", "infra"),),
            exposed_ports=("8080", "53/udp"),
            stop_signal="SIGQUIT",
            comments=((specs[0].ref_id, "base system"), (specs[1].ref_id, "add app")),
            annotations=(("org.opencontainers.image.source", "https://example.invalid/repo"),),
        )
        first = client.export(res, tmp_path / "c", tag="x", image=opts)
        again = client.export(res, tmp_path / "d", tag="y", image=opts)
    assert first.digest == again.digest == a["manifest"]
    _, manifest, cfg = _image(str(tmp_path / "a"), "latest")
    assert cfg["created"] == "2023-11-14T22:13:20Z"
    assert manifest["annotations"]["org.opencontainers.image.created"] == "2023-11-14T22:13:20Z"
    # a different option is a different digest
    c = _export(capsys, *chain, "--oci", str(tmp_path / "e"), *IMAGE_FLAGS, "--created", "@1")
    assert c["manifest"] != a["manifest"]


def test_empty_diff_is_an_empty_layer_in_history(tmp_path, chain, capsys):
    same = tmp_path / "snaps" / "same"
    shutil.copytree(chain[1], same, symlinks=True)
    snaps = [chain[0], chain[1], str(same), chain[2]]
    data = _export(capsys, *snaps, "--oci", str(tmp_path / "oci"), "--tag", "t")
    assert data["layers"][2]["diff_id"] == EMPTY_LAYER_DIFF_ID
    _, manifest, cfg = _image(str(tmp_path / "oci"), "t")
    assert len(manifest["layers"]) == 3 and len(cfg["rootfs"]["diff_ids"]) == 3
    assert [h.get("empty_layer", False) for h in cfg["history"]] == [False, False, True, False]
    require_tool("skopeo", "skopeo")
    subprocess.run(["skopeo", "copy", f"oci:{tmp_path / 'oci'}:t", f"oci:{tmp_path / 'copy'}:t"], check=True)


def test_index_over_two_platforms(tmp_path, chain, capsys):
    out = str(tmp_path / "oci")
    amd = _export(capsys, *chain, "--oci", out, "--tag", "amd", "--platform", "linux/amd64")
    arm = _export(capsys, *chain, "--oci", out, "--tag", "arm", "--platform", "linux/arm64/v8")
    capsys.readouterr()
    assert main(["index", out, "amd", "arm", "--tag", "multi", "--json"]) == 0
    idx = json.loads(capsys.readouterr().out)
    index = _blob(out, idx["index"])
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert [
        (m["digest"], m["platform"], m["annotations"]["org.opencontainers.image.ref.name"])
        for m in index["manifests"]
    ] == [
        (amd["manifest"], {"architecture": "amd64", "os": "linux"}, "amd"),
        (arm["manifest"], {"architecture": "arm64", "os": "linux", "variant": "v8"}, "arm"),
    ]
    with open(os.path.join(out, "index.json")) as f:
        tops = {m["annotations"]["org.opencontainers.image.ref.name"]: m for m in json.load(f)["manifests"]}
    assert tops["multi"]["digest"] == idx["index"] and set(tops) == {"amd", "arm", "multi"}
    require_tool("skopeo", "skopeo")
    raw = subprocess.run(
        ["skopeo", "inspect", "--raw", f"oci:{out}:multi"], check=True, capture_output=True
    ).stdout
    assert [m["platform"]["architecture"] for m in json.loads(raw)["manifests"]] == ["amd64", "arm64"]
    # unknown tag and a duplicate platform are named errors, nothing written
    assert main(["index", out, "amd", "nope", "--tag", "bad"]) == 3
    assert main(["index", out, "amd", "amd", "--tag", "bad"]) == 2
    with open(os.path.join(out, "index.json")) as f:
        # the ref names, not the JSON text: a digest can contain "bad" in hex
        names = {
            m.get("annotations", {}).get("org.opencontainers.image.ref.name")
            for m in json.load(f)["manifests"]
        }
        assert names == {"amd", "arm", "multi"}


@pytest.mark.parametrize(
    "flags",
    [
        ["--cmd", "[1"],
        ["--platform", "linux"],
        ["--env", "NOVALUE"],
        ["--expose", "99999"],
        ["--created", "yesterday"],
        ["--config", "/nonexistent.json"],
        ["--comment", "a", "--comment", "b", "--comment", "c", "--comment", "d"],
    ],
)
def test_bad_image_options_exit_2_and_write_nothing(tmp_path, chain, capsys, flags):
    out = str(tmp_path / "oci")
    assert main(["export", *chain, "--oci", out, "-q", *flags]) == 2
    assert "invalid_image_option" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "index.json"))


def test_submit_takes_the_same_image_options(tmp_path, chain, capsys, monkeypatch):
    monkeypatch.setenv("BLOBCHAIN_STORE", str(tmp_path / "store"))
    out = str(tmp_path / "oci")
    capsys.readouterr()
    rc = main(["submit", *chain, "--oci", out, "--json", "-q", "--cmd", '["/app"]', "--env", "K=V"])
    assert rc == 0, capsys.readouterr().err
    _, _, cfg = _image(out, "latest")
    assert cfg["config"] == {"Cmd": ["/app"], "Env": ["K=V"]}
