"""Serving adapters: the engine and the server use the adapter a request names, and only that one."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backend.adapters import build_adapter, load_adapter, save_adapter
from backend.engine import Engine, EngineConfig
from backend.process import start_server
from backend.tasks.classify import classify
from backend.tasks.templates import TEMPLATE_SETS
from shared_protocol import ErrorCode, ProtocolError
from shared_protocol.client import Client

KW = {"lora": {}, "mrs-adapter": {}, "coop": {},
      "gdpl": {"domain_model": "tiny-quickgelu", "domain_random_weights": True}}
CLASSES = ["red", "green", "blue"]


def _saved(method, tiny, path):
    torch.manual_seed(11)
    a = build_adapter(method, tiny, **KW[method])
    with torch.no_grad():  # away from the identity initialisation, so that the adapter shows
        for _, p in a.adapter_named_parameters():
            p.add_(0.2 * torch.randn_like(p))
    return save_adapter(path / f"{method}.pt", a.eval())


def _pixels(tiles, tiny):
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(tiny.mean).view(1, 3, 1, 1)) / torch.tensor(tiny.std).view(1, 3, 1, 1)


@pytest.mark.parametrize("method", sorted(KW))
def test_classify_with_an_adapter_equals_its_own_computation(method, tiny, tmp_path, rng):
    adapted = load_adapter(_saved(method, tiny, tmp_path), tiny)
    engine = Engine(tiny, EngineConfig(batch_size=4), adapters={"a": adapted})
    tiles = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    templates = TEMPLATE_SETS["simple"]
    _, with_adapter = classify(engine, {"classes": CLASSES, "adapter": "a", "custom_templates": templates},
                               {"tiles": tiles}, lambda p, m: None)
    _, base = classify(engine, {"classes": CLASSES, "custom_templates": templates}, {"tiles": tiles},
                       lambda p, m: None)
    x = _pixels(tiles, tiny)
    with torch.no_grad():
        img = F.normalize(adapted.encode_image(x), dim=-1)
        learned = adapted.class_embeddings(CLASSES, x if method == "gdpl" else None)
        if learned is None:  # LoRA, MRS-Adapter: templates through the adapted text encoder
            txt = torch.stack([F.normalize(adapted.encode_text(tiny.tokenizer([t.format(c) for t in templates]))
                                           .mean(0), dim=-1) for c in CLASSES])
        else:  # CoOp (C x D), GDPL (B x C x D): the learned prompts
            txt = F.normalize(learned, dim=-1)
        sim = torch.einsum("nd,ncd->nc", img, txt) if txt.ndim == 3 else img @ txt.T
        expected = (100 * sim).softmax(-1).numpy()
    np.testing.assert_allclose(with_adapter["probs"], expected, atol=1e-5)
    assert not np.allclose(with_adapter["probs"], base["probs"], atol=1e-3)


def test_server_lists_and_uses_adapters(tiny, tmp_path, rng):
    lora, coop = _saved("lora", tiny, tmp_path), _saved("coop", tiny, tmp_path)
    args = ["--model", "tiny", "--random-weights", "--adapter", f"lora={lora}", "--adapter", f"coop={coop}"]
    tiles = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    with start_server(args) as server, Client(server.address, timeout=60) as c:
        info = c.hello()
        assert {(a["name"], a["method"]) for a in info["adapters"]} == {("lora", "lora"), ("coop", "coop")}
        assert all(a["base_arch"] == "tiny-vit" for a in info["adapters"])
        base = c.classify(CLASSES, tiles).arrays["probs"]
        for name in ("lora", "coop"):
            reply = c.classify(CLASSES, tiles, adapter=name)
            assert reply.result["adapter"] == name
            assert not np.allclose(reply.arrays["probs"], base, atol=1e-3)
        emb = c.embed(tiles, ["a red area"], adapter="lora").arrays
        assert emb["image_embeddings"].shape == (3, 32)
        heat = c.localize(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8), ["red"], adapter="lora",
                          window_sizes=[32], smooth=0).arrays["heatmaps"]
        assert heat.shape == (1, 96, 96)
        with pytest.raises(ProtocolError) as e:
            c.classify(CLASSES, tiles, adapter="nope")
        assert e.value.code == ErrorCode.NOT_FOUND and e.value.details["adapters"] == ["coop", "lora"]


def test_an_adapter_for_another_base_stops_the_server_with_a_clear_message(tmp_path):
    from backend.models import load_model
    other = load_model("tiny-quickgelu", random_weights=True, device="cpu")
    path = save_adapter(tmp_path / "m.pt", build_adapter("mrs-adapter", other))
    from backend.process import ServerStartError
    with pytest.raises(ServerStartError) as e:
        start_server(["--model", "openai-rn50", "--random-weights", "--adapter", f"m={path}"])
    assert any("cannot start" in line and "adapter" in line for line in e.value.output)
