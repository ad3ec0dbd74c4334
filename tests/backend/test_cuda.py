"""CUDA path (runs only where torch sees a GPU; CI has none): same answers as the CPU, autocast on."""
import numpy as np
import pytest
import torch

from backend.engine import Engine, EngineConfig
from backend.models import load_model
from backend.models.preprocess import preprocess_batch
from backend.tasks.classify import classify
from backend.tasks.localize import localize

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")]


def test_cuda_matches_cpu():
    torch.manual_seed(0)
    cpu = load_model("tiny", random_weights=True, device="cpu")
    gpu = load_model("tiny", random_weights=True, device="cuda")
    gpu.model.load_state_dict(cpu.model.state_dict())
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (16, 50, 40, 3), dtype=np.uint8)
    torch.testing.assert_close(preprocess_batch(tiles, gpu).cpu(), preprocess_batch(tiles, cpu), atol=1e-4,
                               rtol=0)
    e_cpu, e_gpu = Engine(cpu, EngineConfig(precision="fp32")), Engine(gpu)  # fp32 reference
    assert e_gpu.precision.autocast in (torch.bfloat16, torch.float16)
    params = {"classes": ["river", "forest", "airport"], "top_k": 3}
    _, a = classify(e_cpu, params, {"tiles": tiles}, lambda p, m: None)
    _, b = classify(e_gpu, params, {"tiles": tiles}, lambda p, m: None)
    np.testing.assert_allclose(a["probs"], b["probs"], atol=0.05)  # bf16 autocast
    canvas = rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)
    lp = {"queries": ["a river"], "window_sizes": [64, 128], "crop_size": 64, "smooth": 0, "normalize": True}
    ha, _ = localize(e_cpu, canvas, lp, lambda p, m: None)
    hb, _ = localize(e_gpu, canvas, lp, lambda p, m: None)
    assert np.corrcoef(ha.ravel(), hb.ravel())[0, 1] > 0.98
