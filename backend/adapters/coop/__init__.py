"""CoOp, the prompt-learning baseline."""
from .config import CoOpConfig
from .model import CoOpAdaptedModel

__all__ = ["CoOpConfig", "CoOpAdaptedModel"]
