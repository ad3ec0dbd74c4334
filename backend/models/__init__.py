"""Model presets, loading and preprocessing.

``presets`` is light; the loading names (which import torch and open_clip) are resolved lazily, so the
command line's client commands start fast.
"""
from .presets import DEFAULT_PRESET, PRESETS, Preset, get_preset

_LAZY = {"LoadedModel", "ModelLoadError", "load_model", "read_state_dict", "resolve_device"}
__all__ = ["DEFAULT_PRESET", "PRESETS", "Preset", "get_preset", *sorted(_LAZY)]


def __getattr__(name: str):
    if name in _LAZY:
        from . import loading
        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
