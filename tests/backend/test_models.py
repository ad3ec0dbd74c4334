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


# The activation each preset's weights were trained with, from the sources (REFERENCE section 2): OpenAI-
# initialised models use QuickGELU; GeoRSCLIP H-14 (LAION laion2b_s32b_b79k) and SkyCLIP B-32 (LAION
# laion2b_e16; SkyScript's notebooks force QuickGELU for ViT-L-14 only) use plain GELU.
EXPECTED_ACTIVATION = {
    "georsclip-vit-b-32": "quickgelu", "georsclip-vit-b-32-ret2": "quickgelu", "georsclip-vit-b-32-rsicd": "quickgelu",
    "georsclip-vit-l-14": "quickgelu", "georsclip-vit-l-14-336": "quickgelu", "georsclip-vit-h-14": "gelu",
    "remoteclip-rn50": "quickgelu", "remoteclip-vit-b-32": "quickgelu", "remoteclip-vit-l-14": "quickgelu",
    "skyclip-vit-b-32": "gelu", "skyclip-vit-l-14": "quickgelu",
    "openai-vit-b-32": "quickgelu", "openai-vit-b-16": "quickgelu", "openai-vit-l-14": "quickgelu",
    "openai-rn50": "quickgelu", "tiny": "gelu", "tiny-quickgelu": "quickgelu",
}


def _built_activation(arch: str) -> str:
    """Build the architecture on the meta device (no memory, no weights) and look at its activations."""
    from open_clip.model import CLIP
    from open_clip.transformer import QuickGELU
    from backend.models.loading import _ensure_builtin_configs
    _ensure_builtin_configs()
    cfg = open_clip.get_model_config(arch)
    assert cfg is not None, arch
    with torch.device("meta"):
        model = CLIP(**cfg)
    acts = {type(m) for m in model.modules() if isinstance(m, (QuickGELU, torch.nn.GELU))}
    assert len(acts) == 1, (arch, acts)
    return "quickgelu" if acts == {QuickGELU} else "gelu"


@pytest.mark.parametrize("name", sorted(EXPECTED_ACTIVATION))
def test_each_preset_builds_the_activation_its_weights_were_trained_with(name):
    p = PRESETS[name]
    assert p.arch in open_clip.list_models() or (CONFIG_DIR / f"{p.arch}.json").is_file(), p.name
    assert _built_activation(p.arch) == EXPECTED_ACTIVATION[name]
    assert p.quick_gelu == (EXPECTED_ACTIVATION[name] == "quickgelu")


def test_every_preset_has_an_expected_activation():
    assert set(PRESETS) == set(EXPECTED_ACTIVATION)
    assert PRESETS["skyclip-vit-b-32"].arch == "ViT-B-32"
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
