"""The whole path on a live tiny server: labelled layer -> chips -> train job -> adapter -> classify; the adapter
folder across restarts; 'unsure'; a job killed mid-epoch resumes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pyogrio
import pytest
from PIL import Image

from backend.adapt.examples import build_examples
from backend.adapt.scene import make_scene
from backend.adapters import describe_adapter
from backend.process import start_server
from shared_protocol import ErrorCode, ProtocolError
from shared_protocol.client import Client

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
CHIP = ["--chip-size", "32", "--max-chips-per-example", "4"]


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "backend", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def serve_args(tmp_path_factory):
    """The tiny model with weights from a file: the same in every server process (random weights are not)."""
    import torch
    from backend.models import load_model
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.manual_seed(0)
    torch.save(load_model("tiny", random_weights=True, device="cpu").model.state_dict(), path)
    return ["--model", "tiny", "--checkpoint", str(path), "--device", "cpu", "--precision", "fp32"]


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return make_scene(tmp_path_factory.mktemp("scene"), n_classes=3, grid=6, cell=64, border=16)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def server(adapter_dir, serve_args):
    proc = start_server([*serve_args, "--adapter-dir", str(adapter_dir)])
    yield proc
    proc.stop()


def test_layer_to_adapter_to_classify_through_the_command_line(tmp_path, scene, server, adapter_dir):
    out = tmp_path / "a.pt"
    run = cli("adapt", "--connect", server.address, "--raster", str(scene.raster), "--labels", str(scene.labels),
              "--class-field", "landcover", "--method", "instant-cache", "--name", "scene", "--out", str(out),
              "--json", *CHIP)
    assert run.returncode == 0, run.stderr
    res = json.loads(run.stdout.strip().splitlines()[-1])
    assert res["name"] == "scene" and res["metrics"]["adapted"]["top1"] >= 90
    assert res["metrics"]["zero_shot"]["n"] == res["metrics"]["adapted"]["n"] > 0
    assert describe_adapter(out)["method"] == "instant-cache"
    assert (adapter_dir / "scene.pt").read_bytes() == out.read_bytes()
    with Client(server.address, timeout=60, retries=0) as client:
        listed = {a["name"]: a for a in client.info()["adapters"]}
    assert listed["scene"]["classes"] == res["classes"]
    assert listed["scene"]["metrics"]["adapted"]["top1"] == res["metrics"]["adapted"]["top1"]
    # the held-out chips (cut the same way here) classified by file with `classify --adapter`
    ex = build_examples(scene.raster, scene.labels, "landcover", chip_size=32, max_per_example=4)
    held = np.flatnonzero(ex.held_out)
    files = []
    for i in held:
        files.append(str(tmp_path / f"chip{i}.png"))
        Image.fromarray(ex.chips[i]).save(files[-1])
    run = cli("classify", "--connect", server.address, "--adapter", "scene", "--json", *files)
    assert run.returncode == 0, run.stderr
    labels = [t["top"][0]["label"] for t in json.loads(run.stdout)["tiles"]]
    acc = 100 * np.mean([lab == ex.classes[ex.labels[i]] for lab, i in zip(labels, held, strict=True)])
    assert acc == pytest.approx(res["metrics"]["adapted"]["top1"])
    # an existing name is refused, and nothing changes
    run = cli("adapt", "--connect", server.address, "--raster", str(scene.raster), "--labels", str(scene.labels),
              "--class-field", "landcover", "--method", "linear-probe", "--name", "scene", *CHIP)
    assert run.returncode == 1 and "exists" in run.stderr
    assert (adapter_dir / "scene.pt").read_bytes() == out.read_bytes()


def test_unsure_writes_the_least_sure_tiles(tmp_path, scene, server):
    with Client(server.address, timeout=60, retries=0) as client:
        if "scene" not in {a["name"] for a in client.info()["adapters"]}:
            pytest.skip("needs the adapter of the test above")
        import rasterio
        with rasterio.open(scene.raster) as ds:
            canvas = ds.read().transpose(1, 2, 0).copy()
            mask = ds.dataset_mask()
        reply = client.classify(["forest", "water", "farmland"], canvas=canvas, tile_size=32, adapter="scene")
    probs = np.sort(reply.arrays["probs"], axis=1)
    boxes = reply.arrays["boxes"]
    valid = np.array([(mask[y0:y1, x0:x1] > 0).mean() for x0, y0, x1, y1 in boxes]) >= 0.5
    margins = np.where(valid, probs[:, -1] - probs[:, -2], np.inf)
    expected = np.sort(margins)[:5]
    out = tmp_path / "next.gpkg"
    run = cli("unsure", "--connect", server.address, "--adapter", "scene", "--grid", "32", "--count", "5",
              "--out", str(out), "--json", str(scene.raster))
    assert run.returncode == 0, run.stderr
    meta, _, _, fields = pyogrio.raw.read(str(out), return_fids=True)
    got = fields[list(meta["fields"]).index("margin")]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert "32618" in meta["crs"]


def test_export_only_needs_no_server(tmp_path, scene):
    run = cli("adapt", "--raster", str(scene.raster), "--labels", str(scene.labels), "--class-field", "landcover",
              "--export-dataset", str(tmp_path / "ds"), "--json", *CHIP)
    assert run.returncode == 0, run.stderr
    classes = json.loads(run.stdout.strip().splitlines()[-1])["classes"]
    assert sorted(p.name for p in (tmp_path / "ds" / "train").iterdir()) == sorted(classes)
    run = cli("adapt", "--raster", str(scene.raster), "--labels", str(scene.labels), "--class-field", "nope",
              "--export-dataset", str(tmp_path / "ds2"), *CHIP)
    assert run.returncode == 2 and "no field 'nope'" in run.stderr and not (tmp_path / "ds2").exists()


def test_saved_adapters_are_served_again_after_a_restart(scene, server, adapter_dir, serve_args):
    if not (adapter_dir / "scene.pt").exists():
        pytest.skip("needs the adapter of the first test")
    tiles = np.stack([np.full((32, 32, 3), c, np.uint8) for c in ((40, 110, 40), (30, 60, 150), (190, 170, 60))])
    with Client(server.address, timeout=60, retries=0) as client:
        before = client.classify(["forest", "water"], tiles, adapter="scene").arrays["probs"]
    server.stop()
    again = start_server([*serve_args, "--adapter-dir", str(adapter_dir)])
    try:
        with Client(again.address, timeout=60, retries=0) as client:
            assert "scene" in {a["name"] for a in client.info()["adapters"]}
            after = client.classify(["forest", "water"], tiles, adapter="scene").arrays["probs"]
    finally:
        again.stop()
    np.testing.assert_allclose(after, before, atol=1e-6)


def test_a_job_killed_mid_epoch_leaves_no_adapter_and_resumes(tmp_path, scene, serve_args):
    ex = build_examples(scene.raster, scene.labels, "landcover", chip_size=32, max_per_example=4)
    params = {"name": "killed", "method": "coop", "classes": ex.classes, "epochs": 4, "batch_size": 8}
    arrays = {"chips": ex.chips, "labels": ex.labels, "groups": ex.groups, "held_out": ex.held_out.astype(np.uint8)}
    first = start_server([*serve_args, "--adapter-dir", str(tmp_path)])
    killed, killed_in = threading.Event(), []

    def kill_in_epoch_2(fraction, message):  # progress is rate-limited: the first message of epoch 2 or later
        epoch = int(message.split()[1].split("/")[0]) if message.startswith("epoch ") else 0
        if epoch >= 2 and not killed.is_set():
            killed.set()
            killed_in.append(epoch)
            first.proc.kill()

    with Client(first.address, timeout=120, retries=0, heartbeat_interval=0.5, heartbeat_liveness=4) as client:
        with pytest.raises(ProtocolError) as e:
            client.request("train", params, arrays, on_progress=kill_in_epoch_2)
    first.stop()
    assert killed.is_set() and e.value.code in (ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT)
    assert not (tmp_path / "killed.pt").exists()
    second = start_server([*serve_args, "--adapter-dir", str(tmp_path)])
    try:
        with Client(second.address, timeout=300, retries=0) as client:
            assert "killed" not in {a["name"] for a in client.info()["adapters"]}
            reply = client.request("train", {**params, "resume": True}, arrays)
            assert "killed" in {a["name"] for a in client.info()["adapters"]}
    finally:
        second.stop()
    # the last checkpoint: the epoch before the one killed (or that one, had it just finished)
    assert reply.result["tuning"]["resumed_from_epoch"] in (killed_in[0] - 1, killed_in[0])
    assert reply.result["tuning"]["resumed_from_epoch"] >= 1
    assert describe_adapter(tmp_path / "killed.pt")["extra"]["adapt"]["examples_sha256"] == reply.result[
        "examples_sha256"]
