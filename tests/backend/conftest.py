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
    return Engine(tiny, EngineConfig(batch_size=8, cache_bytes=64 << 20))


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
