"""The precision policy: which dtype the engine runs a model in on a device (and the CPU facts it rests on)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from .precision_names import PRECISIONS

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cpuinfo_field(keys: Sequence[str], cpuinfo: str = "/proc/cpuinfo") -> Optional[str]:
    """The first processor's value of the first of ``keys`` in ``/proc/cpuinfo`` (Linux); None elsewhere."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in keys:
            return value.strip()
    return None


def cpu_name() -> str:
    """The CPU's model name ("AMD EPYC 9454 ..."), else what ``platform`` knows."""
    import platform
    return cpuinfo_field(("model name",)) or platform.processor() or platform.machine() or "cpu"


def native_bf16_cpu(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16, AMX-BF16 or Arm BF16).

    Only then is bf16 faster than fp32 on a CPU (2.6x for ViT-B-32 on an AVX512-BF16 EPYC); elsewhere bf16
    is emulated and slower. Reads the first processor's flags (Linux); unknown elsewhere, which counts as no.
    """
    flags = cpuinfo_field(("flags", "Features"), cpuinfo) or ""
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(flags.split()))


@dataclass(frozen=True)
class Precision:
    """How the engine runs a model: ``name`` as reported, CUDA ``autocast`` dtype, CPU ``weights`` dtype, and
    ``int8``: whether the CPU copy's Linear layers are dynamically quantised (its inputs stay ``weights``)."""
    name: str
    autocast: Optional[torch.dtype] = None
    weights: torch.dtype = torch.float32
    int8: bool = False


def resolve_precision(requested: str, device: torch.device, cpu_bf16: Optional[bool] = None) -> Precision:
    """The precision to run with on ``device`` for ``--precision`` ``requested``.

    CUDA: autocast to bf16 (fp16 where bf16 is not supported) for ``auto``, or as asked. CPU: autocast is
    slower than fp32 there, so ``bf16`` casts the base model's weights instead; ``auto`` picks it where the
    CPU has native bf16 (``native_bf16_cpu``), else fp32. ``fp32`` is exact everywhere. ``int8`` (CPU only,
    never picked by ``auto``) runs a copy whose Linear layers are dynamically quantised (``models.quantize``).
    """
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; choose from {', '.join(PRECISIONS)}")
    if requested == "fp32":
        return Precision("fp32")
    if requested == "int8":
        if device.type != "cpu":
            raise ValueError(f"int8 runs on a CPU only (dynamically quantised layers have no {device.type} "
                             "kernels): on a GPU use auto (bf16 autocast) or fp16, or run on the CPU with --device cpu")
        return Precision("int8", int8=True)
    if device.type == "cuda":
        if requested == "auto":
            requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return Precision(requested, autocast=_DTYPES[requested])
    if requested == "fp16":
        raise ValueError("fp16 runs on CUDA only; on a CPU use bf16 (fast where the CPU has native bf16) or fp32")
    if requested == "auto":
        requested = "bf16" if (native_bf16_cpu() if cpu_bf16 is None else cpu_bf16) else "fp32"
    return Precision(requested, weights=_DTYPES[requested])


def inference_copy(model: torch.nn.Module, precision: Precision) -> torch.nn.Module:
    """The base model as ``precision`` runs it: an int8 copy, a cast copy, or ``model`` itself (fp32)."""
    if precision.int8:
        from .quantize import int8_copy
        return int8_copy(model)
    return cast_copy(model, precision.weights)


def cast_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` itself for fp32, else a copy whose float parameters and buffers are ``dtype`` (no grad).

    The copy is made tensor by tensor, so the peak memory is the original plus the cast copy.
    """
    if dtype == torch.float32:
        return model
    memo: Dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
    for b in model.buffers():
        memo[id(b)] = b.to(dtype) if b.is_floating_point() else b
    return copy.deepcopy(model, memo).eval()
