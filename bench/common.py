"""Helpers for the benchmarks: machine description, timing, a model with real-size random weights."""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def machine() -> str:
    import torch
    from backend.models.precision import cpu_name, cpuinfo_field, native_bf16_cpu
    cpu = cpu_name()
    family, model = cpuinfo_field(("cpu family",)), cpuinfo_field(("model",))
    if family and model:  # "AMD EPYC" alone names Zen 3 and Zen 4 machines alike
        cpu += f" (family {family} model {model})"
    flags = set((cpuinfo_field(("flags", "Features")) or "").split())
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    simd += ", native bf16" if native_bf16_cpu() else ", no native bf16"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {simd}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} "
            f"threads), {gpu}, Python {platform.python_version()}")


def best_of(fn: Callable[[], object], repeat: int = 3, warmup: int = 1) -> float:
    """Best wall time of ``repeat`` runs after ``warmup`` runs (noise on shared machines only adds)."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def median_of(fn: Callable[[], object], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
