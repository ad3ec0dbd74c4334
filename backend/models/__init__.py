"""Model presets, loading and preprocessing."""
from .loading import LoadedModel, ModelLoadError, load_model, read_state_dict, resolve_device
from .presets import DEFAULT_PRESET, PRESETS, Preset, get_preset

__all__ = ["DEFAULT_PRESET", "PRESETS", "LoadedModel", "ModelLoadError", "Preset", "get_preset", "load_model",
           "read_state_dict", "resolve_device"]
