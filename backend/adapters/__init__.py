"""Parameter-efficient adaptation of open_clip models: LoRA, MRS-Adapter, GDPL, CoOp.

``load_adapter(path, loaded)`` rebuilds an :class:`AdaptedModel` on a base ``LoadedModel`` (which stays
unchanged); ``describe_adapter(path)`` reads the header only; ``save_adapter(path, adapted)`` writes one.
"""
from .base import (METHODS, AdaptedModel, MethodSpec, build_adapter, count_parameters, describe_adapter,
                   get_method, load_adapter, save_adapter)
from .towers import AdapterError

__all__ = ["METHODS", "AdaptedModel", "AdapterError", "MethodSpec", "build_adapter", "count_parameters",
           "describe_adapter", "get_method", "load_adapter", "save_adapter"]
