"""Devices and precision: which device a command runs on, which float type its network computes in, and what the
CPU can do natively. One home for what training, inference, `seg3d doctor` and the benchmarks all ask."""

from __future__ import annotations

import contextlib
import platform
from functools import lru_cache
from pathlib import Path

import torch

from pipeline.errors import Seg3dError

CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def cpu_info() -> tuple[str, frozenset[str]]:
    """The CPU's model name and its feature flags, from /proc/cpuinfo (the machine's name and no flags elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), frozenset()
    model, flags = None, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and flags is None:
            flags = frozenset(value.split())
        if model is not None and flags is not None:
            break
    return model or platform.machine(), flags or frozenset()


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run natively, not emulated (emulated bf16 is slower than fp32)."""
    return bool(cpu_info()[1] & {"avx512_bf16", "amx_bf16"})


def resolve_device(name: str | torch.device, option: str = "--device") -> torch.device:
    """`auto` is the GPU when there is one, else the CPU; asking for CUDA where there is none is a user error.
    `option` names the setting in that error: a command-line flag (--device) or a config key (train.device)."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        sep = " " if option.startswith("-") else "="
        raise Seg3dError(
            f"{option}{sep}{name} but no CUDA device is available; use {option}{sep}cpu or {option}{sep}auto"
        )
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA GPUs that support it (else fp16) and on CPUs with native bf16; fp32 elsewhere."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def precision_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision in `dtype` on `device`; nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
