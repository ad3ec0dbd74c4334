"""Zero-shot is decided once (``backend.zeroshot.Classifier``): ``eval zeroshot --adapter`` classifies with an
instant adapter's own head exactly as the served classify does, and both are the head recomputed with numpy from
the adapter file's tensors."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backend.adapt.examples import build_examples, export_image_folder
from backend.adapt.scene import make_scene
from backend.engine import Engine, EngineConfig
from backend.models import load_model
from backend.process import start_server
from shared_protocol.client import Client

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("instant-cache", "linear-probe")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """The tiny model's weights as a file: the same model in this process, the server and the CLI."""
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.manual_seed(0)
    torch.save(load_model("tiny", random_weights=True, device="cpu").model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    scene = make_scene(tmp_path_factory.mktemp("scene"), n_classes=3, grid=6, cell=64, border=16)
    return build_examples(scene.raster, scene.labels, "landcover", chip_size=32, max_per_example=4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, weights, examples):
    """A live server on the weights file that trained one adapter of each instant method (saved in its folder)."""
    adapters = tmp_path_factory.mktemp("adapters")
    server = start_server(["--model", "tiny", "--checkpoint", str(weights), "--device", "cpu", "--precision", "fp32",
                           "--adapter-dir", str(adapters)])
    ex = examples
    arrays = {"chips": ex.chips, "labels": ex.labels.astype(np.int32), "groups": ex.groups.astype(np.int32),
              "held_out": ex.held_out.astype(np.uint8)}
    try:
        with Client(server.address, timeout=300, retries=0) as client:
            for method in METHODS:
                client.request("train", {"name": method, "method": method, "classes": ex.classes}, arrays)
        yield server, adapters
    finally:
        server.stop()


def numpy_logits(path: Path, feats: np.ndarray, classes) -> np.ndarray:
    """The adapter's head from its saved tensors (float64), columns in ``classes``' order."""
    saved = torch.load(path, weights_only=True)
    cfg, t = saved["header"]["config"], {k: v.double().numpy() for k, v in saved["tensors"].items()}
    if saved["header"]["method"] == "instant-cache":
        g = feats - t["mean"]
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        logits = 100 * feats @ t["text"].T + cfg["alpha"] * np.exp(-cfg["beta"] * (1 - g @ t["keys"].T)) @ t["values"]
    else:
        logits = feats @ t["weight"].T + t["bias"]
    return logits[:, [cfg["classes"].index(c) for c in classes]]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("method", METHODS)
def test_eval_zeroshot_uses_the_adapters_head_like_classify(tmp_path, weights, examples, trained, method):
    server, adapters = trained
    folder = export_image_folder(examples, tmp_path / "ds") / "val"  # the held-out chips as an ImageFolder
    out = tmp_path / "pred.csv"
    run = subprocess.run([sys.executable, "-m", "backend", "eval", "zeroshot", "--data", str(folder),
                          "--adapter", str(adapters / f"{method}.pt"), "--model", "tiny", "--checkpoint", str(weights),
                          "--device", "cpu", "--predictions", str(out), "--json"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    res = json.loads(run.stdout.strip().splitlines()[-1])
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == res["n"] > 0
    classes = sorted({r["label"] for r in rows})  # the ImageFolder's classes (sorted folder names)
    chips = np.stack([np.asarray(Image.open(r["file"])) for r in rows])
    # the served classify with that adapter, on the same pixels
    with Client(server.address, timeout=120, retries=0) as client:
        probs = client.classify(classes, chips, adapter=method, top_k=1).arrays["probs"]
    served = [classes[k] for k in probs.argmax(axis=1)]
    assert [r["predicted"] for r in rows] == served
    # the head recomputed with numpy from the adapter file, on the base model's embeddings of the chips
    loaded = load_model("tiny", checkpoint=weights, device="cpu")
    feats = Engine(loaded, EngineConfig(batch_size=8, precision="fp32")).encode_images(chips).numpy().astype(float)
    ref = softmax(numpy_logits(adapters / f"{method}.pt", feats, classes))
    np.testing.assert_allclose(probs, ref, atol=2e-4)
    assert served == [classes[k] for k in ref.argmax(axis=1)]
    truth = np.array([r["label"] == r["predicted"] for r in rows])
    assert res["top1"] == pytest.approx(100 * truth.mean()) and res["top1"] >= 90  # the head, not chance
