"""LoRA through peft."""
from .config import LoraConfig
from .model import LoraAdaptedModel

__all__ = ["LoraConfig", "LoraAdaptedModel"]
