"""MRS-Adapter (PE-RSITR)."""
from .config import MRSAdapterConfig
from .layers import MRSAdapter
from .model import MRSAdaptedModel

__all__ = ["MRSAdapterConfig", "MRSAdapter", "MRSAdaptedModel"]
