"""--precision int8: the exact nn.Linear self-attention, the int8 copy of the base model, its embeddings against
an independent fp32 computation, and a live server that classifies and adapts with it."""
import copy
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backend.engine import Engine, EngineConfig
from backend.models.preprocess import preprocess_batch
from backend.models.quantize import SelfAttention, with_linear_attention
from backend.process import start_server
from shared_protocol.client import Client

CPU = torch.device("cpu")


def quantised_linear():
    import torch.ao.nn.quantized.dynamic as qd
    return qd.Linear


@pytest.fixture
def int8_engine(tiny):
    return Engine(tiny, EngineConfig(batch_size=8, precision="int8", cache_bytes=0))


def fp32_reference(loaded, tiles):
    """Independent of the engine: open_clip's encode_image on the loaded fp32 model, normalised."""
    with torch.inference_mode():
        return F.normalize(loaded.model.encode_image(preprocess_batch(tiles, loaded)), dim=-1)


# -- the self-attention made of nn.Linear layers ------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", [None, "float", "bool", "3d"])
def test_linear_self_attention_equals_multihead_attention(batch_first, mask):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    n, length = 3, 7
    x = torch.randn((n, length, 32) if batch_first else (length, n, 32))
    causal = torch.full((length, length), float("-inf")).triu_(1)
    m = {None: None, "float": causal, "bool": torch.isinf(causal),
         "3d": torch.randn(n * 4, length, length)}[mask]
    assert SelfAttention.replaces(mha)
    with torch.inference_mode():
        want = mha(x, x, x, need_weights=False, attn_mask=m)[0]
        got, weights = SelfAttention(mha)(x, x, x, need_weights=False, attn_mask=m)
    assert weights is None
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_only_plain_self_attention_is_replaced():
    assert not SelfAttention.replaces(nn.MultiheadAttention(32, 4, kdim=16, vdim=16))
    assert not SelfAttention.replaces(nn.MultiheadAttention(32, 4, add_bias_kv=True))
    assert not SelfAttention.replaces(nn.MultiheadAttention(32, 4, add_zero_attn=True))
    attn = SelfAttention(nn.MultiheadAttention(32, 4, batch_first=True))
    x, y = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    with pytest.raises(RuntimeError, match="self-attention only"):
        attn(x, y, y)


def test_the_model_with_linear_attention_gives_the_same_embeddings(tiny, rng):
    swapped = with_linear_attention(copy.deepcopy(tiny.model)).eval()
    blocks = [m for m in swapped.modules() if hasattr(m, "ln_1")]
    assert blocks and all(isinstance(b.attn, SelfAttention) for b in blocks)
    tiles = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    tokens = tiny.tokenizer(["a red area", "dense forest", "an airport"])
    with torch.inference_mode():
        x = preprocess_batch(tiles, tiny)
        torch.testing.assert_close(swapped.encode_image(x), tiny.model.encode_image(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(swapped.encode_text(tokens), tiny.model.encode_text(tokens), atol=1e-5, rtol=1e-5)


# -- the int8 copy ------------------------------------------------------------------------------------------
def test_int8_runs_a_quantised_copy_and_leaves_the_loaded_model_alone(tiny, int8_engine):
    e = int8_engine
    assert e.precision.name == "int8" and e.precision.autocast is None
    assert e.adapter_precision == "fp32" and e.input_dtype(None) == torch.float32
    assert e.model_for(None) is e.base_model is not tiny.model
    # every Linear layer of the copy is int8, attention projections included; none is left in fp32
    qlinear = quantised_linear()
    n_blocks = sum(1 for m in tiny.model.modules() if hasattr(m, "ln_1"))
    assert sum(isinstance(m, qlinear) for m in e.base_model.modules()) == 4 * n_blocks
    assert not any(type(m) in (nn.Linear, nn.MultiheadAttention) for m in e.base_model.modules())
    # the loaded model is untouched (the adapters and the trainers use it)...
    assert any(type(m) is nn.MultiheadAttention for m in tiny.model.modules())
    assert not any(isinstance(m, qlinear) for m in tiny.model.modules())
    assert {p.dtype for p in tiny.model.parameters()} == {torch.float32}
    # ... and the copy shares the tensors it did not quantise with it (no second fp32 model in memory)
    kept = {p.data_ptr() for p in e.base_model.parameters()}
    assert kept and kept <= {p.data_ptr() for p in tiny.model.parameters()}
    assert not any(p.requires_grad for p in e.base_model.parameters())
    assert not e.base_model.training


def test_cuda_refuses_int8_before_touching_the_model(tiny):
    on_cuda = dataclasses.replace(tiny, device=torch.device("cuda"))
    with pytest.raises(ValueError, match="int8 runs on a CPU only"):
        Engine(on_cuda, EngineConfig(precision="int8"))


def test_int8_image_embeddings_are_close_to_an_independent_fp32_computation(tiny, int8_engine, rng):
    tiles = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    got = int8_engine.encode_images(tiles)
    ref = fp32_reference(tiny, tiles)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert float(F.cosine_similarity(got, ref).min()) >= 0.99
    assert float((got - ref).abs().max()) > 1e-4  # it really ran in int8
    # windows of a canvas (localize, index) go through the same copy
    canvas = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    boxes = np.array([[0, 0, 32, 32], [16, 16, 48, 48], [32, 32, 64, 64]])
    win = int8_engine.encode_windows(canvas, boxes, None, None, (0.0, 255.0))
    ref = fp32_reference(tiny, np.stack([canvas[y0:y1, x0:x1] for x0, y0, x1, y1 in boxes]))
    assert float(F.cosine_similarity(win, ref).min()) >= 0.99


def test_int8_text_embeddings_are_close_to_fp32(tiny, int8_engine):
    texts = ["a harbour with many boats", "dense forest", "an airport", "a river"]
    got = int8_engine.encode_texts(texts)  # the trimmed text encoder, on the int8 copy
    with torch.inference_mode():
        ref = F.normalize(tiny.model.encode_text(tiny.tokenizer(texts)), dim=-1)
    assert float(F.cosine_similarity(got, ref).min()) >= 0.99
    assert float((got - ref).abs().max()) > 1e-5


def test_an_index_fingerprint_is_the_same_in_int8_and_fp32(tiny, int8_engine, engine):
    from backend.index.identity import model_identity, weights_fingerprint
    assert model_identity(int8_engine)["fingerprint"] == model_identity(engine)["fingerprint"]
    assert weights_fingerprint(int8_engine.base_model) != model_identity(engine)["fingerprint"]  # why


def test_vit_b_32_in_int8_stays_close_to_fp32():
    """The real architecture (random weights), once: 12 + 12 blocks of 768 / 512 wide layers."""
    from backend.models import load_model
    torch.manual_seed(0)
    loaded = load_model("ViT-B-32", random_weights=True, device="cpu")
    e = Engine(loaded, EngineConfig(batch_size=4, precision="int8", cache_bytes=0))
    tiles = np.random.default_rng(3).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    got = e.encode_images(tiles)
    ref = fp32_reference(loaded, tiles)
    assert float(F.cosine_similarity(got, ref).min()) >= 0.99
    assert float((got - ref).abs().max()) > 1e-4
    texts = ["a harbour with many boats", "dense forest"]
    with torch.inference_mode():
        ref = F.normalize(loaded.model.encode_text(loaded.tokenizer(texts)), dim=-1)
    assert float(F.cosine_similarity(e.encode_texts(texts), ref).min()) >= 0.99


# -- a live server in int8 ----------------------------------------------------------------------------------
def test_an_int8_server_classifies_and_adapts(tmp_path):
    """``serve --precision int8 --adapter-dir none`` (the setting where a bf16 server frees its fp32 weights):
    says int8 at start-up and in ping, embeds close to fp32, runs an instant and a trained job, classifies
    with the new adapter."""
    from backend.adapt.examples import build_examples
    from backend.adapt.scene import make_scene
    from backend.models import load_model
    torch.manual_seed(0)
    loaded = load_model("tiny", random_weights=True, device="cpu")
    weights = tmp_path / "tiny.pt"
    torch.save(loaded.model.state_dict(), weights)
    scene = make_scene(tmp_path / "scene", n_classes=3, grid=6, cell=64, border=16)
    ex = build_examples(scene.raster, scene.labels, "landcover", chip_size=32, max_per_example=4)
    arrays = {"chips": ex.chips, "labels": ex.labels, "groups": ex.groups, "held_out": ex.held_out.astype(np.uint8)}
    server = start_server(["--model", "tiny", "--checkpoint", str(weights), "--device", "cpu", "--precision", "int8",
                           "--adapter-dir", "none"])
    try:
        assert any(" in int8; " in line for line in server.output), server.output
        ping = subprocess.run([sys.executable, "-m", "backend", "ping", "--connect", server.address, "--json"],
                              capture_output=True, text=True, timeout=60)
        assert ping.returncode == 0, ping.stderr
        device = json.loads(ping.stdout)["device"]
        assert (device["precision"], device["adapter_precision"]) == ("int8", "fp32")
        with Client(server.address, timeout=120, retries=0) as client:
            got = client.embed(ex.chips[:8]).arrays["image_embeddings"]
            ref = fp32_reference(loaded, ex.chips[:8]).numpy()
            cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
            assert cos.min() >= 0.99 and np.abs(got - ref).max() > 1e-4
            zero = client.classify(ex.classes, ex.chips[:6], templates="simple").result
            assert [t["index"] for t in zero["tiles"]] == list(range(6)) and zero["tiles"][0]["label"] in ex.classes
            params = {"classes": ex.classes, "templates": "simple"}
            res = client.request("train", {**params, "name": "quick", "method": "instant-cache"}, arrays).result
            assert res["metrics"]["adapted"]["top1"] >= 90  # the scene's classes differ visibly
            assert res["metrics"]["zero_shot"]["n"] == res["metrics"]["adapted"]["n"] == int(ex.held_out.sum())
            trained = client.request("train", {**params, "name": "slow", "method": "coop", "epochs": 1,
                                               "batch_size": 8}, arrays).result  # fp32 weights kept: it trains
            assert trained["method"] == "coop" and trained["tuning"]["history"][-1]["epoch"] == 1
            held = np.flatnonzero(ex.held_out)
            reply = client.classify(ex.classes, ex.chips[held], adapter="quick").result
            top = [t["label"] for t in reply["tiles"]]
            acc = 100 * np.mean([lab == ex.classes[ex.labels[i]] for lab, i in zip(top, held, strict=True)])
            assert acc == pytest.approx(res["metrics"]["adapted"]["top1"])
    finally:
        server.stop()
