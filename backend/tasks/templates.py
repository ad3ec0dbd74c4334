"""Prompt templates and class-name normalisation (REFERENCE section 3)."""
from __future__ import annotations

from typing import Dict, List, Sequence

SUBJECTS = ("remote sensing image", "aerial image", "satellite image")
ADJECTIVES = ("low resolution", "bad", "cropped", "bright", "dark", "close-up", "black and white",
              "jpeg corrupted", "blurry", "good")
SIZES = ("large", "nice", "small", "weird", "cool")


def _article(word: str) -> str:
    """English's indefinite article before ``word`` ("an aerial image", "a satellite image")."""
    return "an" if word[0] in "aeiou" else "a"


def _georsclip_templates() -> List[str]:
    """GeoRSCLIP's 105 templates in its order (``inference/classname_and_prompt/RSAID.py``): "an aerial
    image of ...", but "a bad aerial image of ..." (the article goes with the word that follows it)."""
    out: List[str] = []
    for s in SUBJECTS:
        an_s = f"{_article(s)} {s}"
        out += [f"{an_s} of many {{}}.", f"{an_s} of a {{}}.", f"{an_s} of the {{}}.",
                f"{an_s} of the hard to see {{}}.", f"{an_s} of a hard to see {{}}."]
        for a in ADJECTIVES:
            out += [f"{_article(a)} {a} {s} of the {{}}.", f"{_article(a)} {a} {s} of a {{}}."]
        for b in SIZES:
            out += [f"{an_s} of the {b} {{}}.", f"{an_s} of a {b} {{}}."]
    return out


TEMPLATE_SETS: Dict[str, List[str]] = {
    "georsclip": _georsclip_templates(),  # 105 = 35 patterns x 3 subjects
    "remoteclip": ["a satellite photo of {}."],
    "skyclip": ["a satellite photo of {}.", "a satellite image of {}"],
    "simple": ["a remote sensing image of {}."],
    "none": ["{}"],
}


def get_templates(name: str) -> List[str]:
    try:
        return list(TEMPLATE_SETS[name])
    except KeyError:
        from shared_protocol import ErrorCode, ProtocolError
        raise ProtocolError(ErrorCode.BAD_PARAMS, f"unknown template set {name!r}",
                            {"known": sorted(TEMPLATE_SETS)}) from None


def normalize_classname(name: str) -> str:
    """GeoRSCLIP's normalisation: lower case, '_' and '/' become spaces, whitespace collapsed."""
    return " ".join(name.replace("_", " ").replace("/", " ").lower().split())


def expand(templates: Sequence[str], classname: str) -> List[str]:
    return [t.replace("{}", classname) for t in templates]
