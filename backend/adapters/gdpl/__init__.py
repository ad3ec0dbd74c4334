"""GDPL, generalized domain prompt learning."""
from .config import GDPLConfig
from .layers import CoupledLoRA, DomainBias, QuaternionLinear, hamilton_matrix
from .model import GDPLAdaptedModel

__all__ = ["GDPLConfig", "CoupledLoRA", "DomainBias", "QuaternionLinear", "hamilton_matrix", "GDPLAdaptedModel"]
