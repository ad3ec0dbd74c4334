"""``python -m backend weights``: the exact file, address and target path, and a clear failure offline."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(*args, env=None):
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "backend", "weights", *args], capture_output=True, text=True,
                          timeout=120, env=full, cwd=str(ROOT))


def test_instructions_name_the_file_the_address_and_the_folder(tmp_path):
    from backend.models.presets import PRESETS
    preset = PRESETS["remoteclip-vit-b-32"]
    out = run("--model", preset.name, "--json", env={"MAPQUERY_WEIGHTS": str(tmp_path)})
    info = json.loads(out.stdout)
    assert out.returncode == 0 and info["downloadable"] and not info["present"]
    assert info["url"] == f"https://huggingface.co/{preset.hf_repo}/resolve/main/{preset.hf_filename}"
    assert info["path"] == str(tmp_path / Path(preset.hf_filename).name) and info["path"] in info["instructions"]
    # the loader looks exactly there
    from backend.models import loading
    os.environ["MAPQUERY_WEIGHTS"] = str(tmp_path)
    try:
        assert loading.weights_dir() / preset.weight_filename == Path(info["path"])
    finally:
        del os.environ["MAPQUERY_WEIGHTS"]
    (tmp_path / preset.weight_filename).write_bytes(b"x")
    assert json.loads(run("--model", preset.name, "--json", env={"MAPQUERY_WEIGHTS": str(tmp_path)}).stdout)["present"]


def test_presets_without_a_file_say_what_to_do():
    assert "--random-weights" in json.loads(run("--model", "tiny", "--json").stdout)["instructions"]
    assert "--checkpoint" in json.loads(run("--model", "no-such", "--json").stdout)["instructions"]


def test_download_offline_fails_clearly_and_leaves_nothing(tmp_path):
    out = run("--model", "georsclip-vit-b-32", "--download", env={"MAPQUERY_WEIGHTS": str(tmp_path),
                                                                  "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2
    assert "cannot download https://huggingface.co/Zilun/GeoRSCLIP" in out.stderr
    assert str(tmp_path / "RS5M_ViT-B-32.pt") in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_gpu_unused_reason(monkeypatch):
    import torch
    from backend.models import loading
    cpu = torch.device("cpu")
    assert loading.gpu_unused_reason("cuda:0", torch.device("cuda:0")) == ""
    assert loading.gpu_unused_reason("cpu", cpu) == "--device cpu was asked for"
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    assert "no CUDA build" in loading.gpu_unused_reason("auto", cpu)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(loading.shutil, "which", lambda name: None)
    monkeypatch.setattr(loading.os.path, "exists", lambda p: False)
    assert loading.gpu_unused_reason("auto", cpu) == "no NVIDIA driver"
    monkeypatch.setattr(loading.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    assert "12.4" in loading.gpu_unused_reason("auto", cpu)
    loaded = loading.load_model("tiny", random_weights=True, device="cpu")
    assert loaded.extra["gpu_unused"] == "--device cpu was asked for"
