"""Presets, QuickGELU, checkpoint layouts, safe loading, clear errors (tiny random models, no downloads)."""
import json

import open_clip
import pytest
import torch

from backend.models import PRESETS, ModelLoadError, load_model
from backend.models.presets import CONFIG_DIR, Preset


def _image_feats(loaded, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, *loaded.image_size, generator=g)
    with torch.no_grad():
        return loaded.model.encode_image(x), loaded.model.encode_text(loaded.tokenizer(["a river", "a forest"]))


def test_presets_pick_quick_gelu_exactly_for_openai_initialised_models():
    for p in PRESETS.values():
        if p.family == "test":
            assert p.quick_gelu == p.name.endswith("quickgelu")
            continue
        assert p.arch in open_clip.list_models() or (CONFIG_DIR / f"{p.arch}.json").is_file(), p.name
        openai_init = p.family in ("OpenAI CLIP", "RemoteCLIP", "SkyCLIP") or (
            p.family == "GeoRSCLIP" and "h-14" not in p.name)
        assert p.quick_gelu == openai_init, p.name
    assert PRESETS["georsclip-vit-h-14"].arch == "ViT-H-14"
    assert PRESETS["georsclip-vit-b-32"].hf_filename == "ckpt/RS5M_ViT-B-32.pt"


def test_quick_gelu_checkpoint_loads_right_only_into_the_quick_gelu_preset(tmp_path):
    torch.manual_seed(3)
    src = load_model("tiny-quickgelu", random_weights=True, device="cpu")
    assert src.quick_gelu
    ckpt = tmp_path / "qg.pt"
    torch.save(src.model.state_dict(), ckpt)
    right = load_model("tiny-quickgelu", checkpoint=ckpt, device="cpu")
    wrong = load_model("tiny", checkpoint=ckpt, device="cpu")  # same tensors, plain GELU: the pitfall
    (ri, rt), (si, st), (wi, _) = _image_feats(right), _image_feats(src), _image_feats(wrong)
    torch.testing.assert_close(ri, si)
    torch.testing.assert_close(rt, st)
    assert right.quick_gelu and not wrong.quick_gelu
    assert (wi - si).abs().max() > 1e-4  # silently different features with the wrong activation


@pytest.mark.parametrize("layout", ["plain", "state_dict", "module", "state_dict+module"])
def test_every_checkpoint_layout_loads(tmp_path, layout):
    torch.manual_seed(5)
    src = load_model("tiny", random_weights=True, device="cpu")
    sd = src.model.state_dict()
    if "module" in layout:
        sd = {f"module.{k}": v for k, v in sd.items()}
    obj = {"state_dict": sd, "epoch": 20} if layout.startswith("state_dict") else sd
    torch.save(obj, tmp_path / "c.pt")
    loaded = load_model("tiny", checkpoint=tmp_path / "c.pt", device="cpu")
    assert not loaded.random_weights and "c.pt" in loaded.weights
    torch.testing.assert_close(_image_feats(loaded)[0], _image_feats(src)[0])


class NotATensor:
    pass


def test_checkpoints_load_weights_only(tmp_path):
    src = load_model("tiny", random_weights=True, device="cpu")
    torch.save({"state_dict": src.model.state_dict(), "payload": NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(ModelLoadError, match="cannot read checkpoint"):
        load_model("tiny", checkpoint=tmp_path / "evil.pt", device="cpu")


def test_wrong_architecture_and_garbage_fail_loudly(tmp_path):
    src = load_model("tiny", random_weights=True, device="cpu")
    sd = dict(src.model.state_dict())
    sd.pop("text_projection")
    torch.save(sd, tmp_path / "partial.pt")
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_model("tiny", checkpoint=tmp_path / "partial.pt", device="cpu")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_model("tiny", checkpoint=tmp_path / "junk.pt", device="cpu")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("tiny", checkpoint=tmp_path / "missing.pt", device="cpu")


def test_unknown_model_and_missing_weights_say_what_to_do(monkeypatch, tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model"):
        load_model("no-such-model", device="cpu")
    monkeypatch.setenv("MAPQUERY_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError) as e:
        load_model("tiny", device="cpu", offline=True)
    assert "--random-weights" in e.value.message
    monkeypatch.setitem(PRESETS, "tiny-hub", Preset("tiny-hub", "tiny-vit", "test", "x", hf_repo="org/tiny",
                                                   hf_filename="ckpt/tiny.pt"))
    with pytest.raises(ModelLoadError) as e:
        load_model("tiny-hub", device="cpu", offline=True)
    assert str(tmp_path / "tiny.pt") in e.value.message and "huggingface.co/org/tiny" in e.value.message


def test_weights_are_found_in_the_weights_dir_and_the_hub_cache(monkeypatch, tmp_path):
    torch.manual_seed(9)
    src = load_model("tiny", random_weights=True, device="cpu")
    monkeypatch.setitem(PRESETS, "tiny-hub", Preset("tiny-hub", "tiny-vit", "test", "x", hf_repo="org/tiny",
                                                   hf_filename="ckpt/tiny.pt"))
    # 1. a Hugging Face hub cache laid out as huggingface_hub writes it
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    repo = tmp_path / "hf" / "hub" / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123" / "ckpt").mkdir(parents=True)
    torch.save(src.model.state_dict(), repo / "snapshots" / "abc123" / "ckpt" / "tiny.pt")
    monkeypatch.setenv("MAPQUERY_WEIGHTS", str(tmp_path / "empty"))
    hub = load_model("tiny-hub", device="cpu", offline=True)
    assert "snapshots" in hub.weights
    torch.testing.assert_close(_image_feats(hub)[0], _image_feats(src)[0])
    # 2. the local weights folder wins
    (tmp_path / "w").mkdir()
    torch.save(src.model.state_dict(), tmp_path / "w" / "tiny.pt")
    monkeypatch.setenv("MAPQUERY_WEIGHTS", str(tmp_path / "w"))
    assert load_model("tiny-hub", device="cpu", offline=True).weights == str(tmp_path / "w" / "tiny.pt")


def test_a_custom_model_config_file(tmp_path):
    cfg = json.loads((CONFIG_DIR / "tiny-vit.json").read_text())
    cfg["embed_dim"] = 16
    (tmp_path / "my-arch.json").write_text(json.dumps(cfg))
    loaded = load_model(model_config=tmp_path / "my-arch.json", random_weights=True, device="cpu")
    assert loaded.arch == "my-arch" and loaded.embed_dim == 16
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="embed_dim"):
        load_model(model_config=tmp_path / "bad.json", random_weights=True)


def test_cuda_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ModelLoadError, match="--device cpu"):
        load_model("tiny", random_weights=True, device="cuda")
