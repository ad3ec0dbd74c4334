"""Shared fixtures for backend tests: tiny random models (no downloads), the engine, a live server."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from backend.engine import Engine, EngineConfig
from backend.models import load_model

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny():
    """The 2-layer, 64-wide random ViT CLIP (image 32 px), on CPU."""
    torch.manual_seed(0)
    return load_model("tiny", random_weights=True, device="cpu")


@pytest.fixture
def engine(tiny):
    return Engine(tiny, EngineConfig(batch_size=8, cache_bytes=64 << 20, precision="fp32"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"the shared sample rasters are not at {DATA} (they come with the developer checkout)")
    return DATA


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="module")
def live_server():
    """A real backend subprocess serving the tiny model; stopped after the module."""
    from backend.process import start_server
    server = start_server(["--model", "tiny", "--random-weights", "--device", "cpu", "--max-array-mb", "64",
                           "--max-canvas-pixels", str(1000 * 1000)])
    yield server
    server.stop()


# -- PEFT (adapters, training, evaluation): a small learnable synthetic data set ---------------------------
PEFT_COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def make_colour_dataset(root: Path, per_class: int = 12, size: int = 32, seed: int = 0) -> Path:
    """Noisy single-colour images as an ImageFolder (root/folder/CLASS/*.png), the same images flat in root,
    a Karpathy JSON (root/captions.json: 2/3 train, 1/3 test) and a CSV (root/captions.csv)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    items, rows = [], ["filename,title"]
    for c, rgb in PEFT_COLOURS.items():
        (root / "folder" / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.clip(np.array(rgb)[None, None] + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            name = f"{c}_{i}.png"
            Image.fromarray(img).save(root / "folder" / c / name)
            Image.fromarray(img).save(root / name)
            split = "train" if i < per_class * 2 // 3 else "test"
            caps = [f"a {c} area", f"the {c} image"]
            items.append({"filename": name, "split": split, "sentences": [{"raw": t} for t in caps]})
            rows += [f"{name},{t}" for t in caps]
    import json
    (root / "captions.json").write_text(json.dumps({"images": items}))
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="session")
def colour_data(tmp_path_factory) -> Path:
    return make_colour_dataset(tmp_path_factory.mktemp("colours"))


@pytest.fixture
def tiny_fresh():
    """A tiny random model of its own (tests that train or compare against the base)."""
    torch.manual_seed(0)
    return load_model("tiny", random_weights=True, device="cpu")
