"""Where the work runs: the device, the compute dtype, autocast and memory figures.

One place, so training, evaluation, the reference pass and `qdpo bench` measure and cast the
same way.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any

import torch

GIB = 2**30


def default_device() -> torch.device:
    """The GPU (under torchrun, this rank's: LOCAL_RANK), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def compute_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The recipe's model.compute_dtype; `auto` is bf16 where the GPU has it, fp32 on the CPU."""
    if setting == "fp32":
        return torch.float32
    if setting == "bf16":
        return torch.bfloat16
    if setting == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def autocast_for(device: torch.device, dtype: torch.dtype) -> Any:
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak allocated and reserved GPU memory in GiB since the last reset (nothing on a CPU)."""
    if device.type != "cuda":
        return {}
    return {"mem/peak_alloc_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "mem/peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}


def total_memory_gib(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    return torch.cuda.get_device_properties(device).total_memory / GIB
