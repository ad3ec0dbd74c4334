"""Named model presets: architecture (with the right activation) and where the weights live.

Models initialised from OpenAI CLIP use QuickGELU: their presets name the ``-quickgelu`` open_clip config
(REFERENCE section 2). Models initialised from LAION weights use plain GELU: GeoRSCLIP ViT-H-14 (from
``laion2b_s32b_b79k``) and SkyCLIP ViT-B-32 (from ``laion2b_e16``; SkyScript's notebooks turn QuickGELU on for
ViT-L-14 only). A strict load cannot catch a wrong activation (the shapes are the same).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_PRESET = "georsclip-vit-b-32"


@dataclass(frozen=True)
class Preset:
    name: str
    arch: str  # an open_clip config name, or a JSON file in models/configs
    family: str
    description: str
    hf_repo: Optional[str] = None  # Hugging Face hub repository holding the checkpoint
    hf_filename: Optional[str] = None  # path of the checkpoint inside that repository
    pretrained_tag: Optional[str] = None  # an open_clip pretrained tag (downloads through open_clip)
    random_only: bool = False  # a test/demo architecture without published weights

    @property
    def quick_gelu(self) -> bool:
        return self.arch.endswith("-quickgelu")

    @property
    def weight_filename(self) -> Optional[str]:
        return Path(self.hf_filename).name if self.hf_filename else None

    def to_dict(self) -> Dict[str, object]:
        d = asdict(self)
        d["quick_gelu"] = self.quick_gelu
        return d


def _georsclip(suffix: str, arch: str, what: str) -> Preset:
    return Preset(f"georsclip-{suffix}", arch, "GeoRSCLIP", f"GeoRSCLIP {what} (RS5M)",
                  hf_repo="Zilun/GeoRSCLIP", hf_filename=f"ckpt/RS5M_{_GEORS_FILES[suffix]}.pt")


_GEORS_FILES = {
    "vit-b-32": "ViT-B-32", "vit-b-32-ret2": "ViT-B-32_RET-2", "vit-b-32-rsicd": "ViT-B-32_RSICD",
    "vit-l-14": "ViT-L-14", "vit-l-14-336": "ViT-L-14-336", "vit-h-14": "ViT-H-14",
}

PRESETS: Dict[str, Preset] = {p.name: p for p in (
    _georsclip("vit-b-32", "ViT-B-32-quickgelu", "ViT-B/32"),
    _georsclip("vit-b-32-ret2", "ViT-B-32-quickgelu", "ViT-B/32 tuned for retrieval (RET-2)"),
    _georsclip("vit-b-32-rsicd", "ViT-B-32-quickgelu", "ViT-B/32 tuned on RSICD"),
    _georsclip("vit-l-14", "ViT-L-14-quickgelu", "ViT-L/14"),
    _georsclip("vit-l-14-336", "ViT-L-14-336-quickgelu", "ViT-L/14 at 336 px"),
    _georsclip("vit-h-14", "ViT-H-14", "ViT-H/14 (from LAION-2B, plain GELU)"),
    Preset("remoteclip-rn50", "RN50-quickgelu", "RemoteCLIP", "RemoteCLIP ResNet-50",
           hf_repo="chendelong/RemoteCLIP", hf_filename="RemoteCLIP-RN50.pt"),
    Preset("remoteclip-vit-b-32", "ViT-B-32-quickgelu", "RemoteCLIP", "RemoteCLIP ViT-B/32",
           hf_repo="chendelong/RemoteCLIP", hf_filename="RemoteCLIP-ViT-B-32.pt"),
    Preset("remoteclip-vit-l-14", "ViT-L-14-quickgelu", "RemoteCLIP", "RemoteCLIP ViT-L/14",
           hf_repo="chendelong/RemoteCLIP", hf_filename="RemoteCLIP-ViT-L-14.pt"),
    Preset("skyclip-vit-b-32", "ViT-B-32", "SkyCLIP",
           "SkyCLIP ViT-B/32 (SkyScript, from LAION laion2b_e16: plain GELU; pass the unzipped epoch_20.pt "
           "with --checkpoint)"),
    Preset("skyclip-vit-l-14", "ViT-L-14-quickgelu", "SkyCLIP",
           "SkyCLIP ViT-L/14 (SkyScript, from OpenAI: QuickGELU; pass the unzipped epoch_20.pt with --checkpoint)"),
    Preset("openai-vit-b-32", "ViT-B-32-quickgelu", "OpenAI CLIP", "OpenAI CLIP ViT-B/32",
           pretrained_tag="openai"),
    Preset("openai-vit-b-16", "ViT-B-16-quickgelu", "OpenAI CLIP", "OpenAI CLIP ViT-B/16",
           pretrained_tag="openai"),
    Preset("openai-vit-l-14", "ViT-L-14-quickgelu", "OpenAI CLIP", "OpenAI CLIP ViT-L/14",
           pretrained_tag="openai"),
    Preset("openai-rn50", "RN50-quickgelu", "OpenAI CLIP", "OpenAI CLIP ResNet-50", pretrained_tag="openai"),
    Preset("tiny", "tiny-vit", "test", "2-layer, 64-wide ViT for tests and offline demos (random weights)",
           random_only=True),
    Preset("tiny-quickgelu", "tiny-vit-quickgelu", "test", "tiny ViT with QuickGELU (random weights)",
           random_only=True),
)}


def weights_dir() -> Path:
    """Where the backend looks for a preset's checkpoint first: ``$MAPQUERY_WEIGHTS`` or
    ``~/.cache/mapquery-rs/weights``."""
    return Path(os.environ.get("MAPQUERY_WEIGHTS", Path.home() / ".cache" / "mapquery-rs" / "weights"))


def get_preset(name: str) -> Optional[Preset]:
    return PRESETS.get(name.lower())
