"""Stopping a run well: Ctrl-C and SIGTERM finish the step and checkpoint, out of GPU memory
and non-finite steps end with one message saying what to change. Used by the training loop
and `qdpo bench`."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any, Callable

import torch

from qdpo import console as ui
from qdpo.device import memory_stats, total_memory_gib
from qdpo.errors import QdpoError
from qdpo.recipe import Recipe


class Interrupt:
    """First Ctrl-C / SIGTERM: finish the step, checkpoint, stop. Second: exit at once."""

    def __init__(self) -> None:
        self.requested = False
        self.old: dict[int, Any] = {}

    def __enter__(self) -> "Interrupt":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.old[sig] = signal.signal(sig, self.handle)
            except ValueError:  # not the main thread
                pass
        return self

    def handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        again = "press Ctrl-C again" if signum == signal.SIGINT else "send SIGTERM again"
        ui.warn(f"interrupt: saving a checkpoint after this step ({again} to quit now)")

    def __exit__(self, *exc: Any) -> None:
        for sig, h in self.old.items():
            signal.signal(sig, h)


class out_of_memory_message:
    """Turn a CUDA out-of-memory error into one message saying what to change."""

    def __init__(self, recipe: Recipe, device: torch.device, where: Callable[[], str]):
        self.recipe, self.device, self.where = recipe, device, where

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if kind is None or not issubclass(kind, torch.cuda.OutOfMemoryError):
            return
        r, peak = self.recipe, memory_stats(self.device).get("mem/peak_alloc_gib", 0.0)
        raise QdpoError(
            f"Out of GPU memory {self.where()} (max_length {r.data.max_length}, max_tokens "
            f"{r.train.max_tokens}, {r.train.micro_batch_pairs} pairs per micro-batch; peak "
            f"allocated {peak:.1f} GiB of {total_memory_gib(self.device):.1f} GiB). Set "
            "train.max_tokens: auto (or see `qdpo plan` for what fits), lower "
            "train.micro_batch_pairs (gradient accumulation keeps the step size) or "
            "data.max_length, keep model.gradient_checkpointing on, or use optimizer "
            "paged_adamw_8bit. A training run resumes from its last checkpoint with --resume."
        ) from None


def nonfinite_error(bad_steps: int, step: int, run_dir: Path) -> QdpoError:
    return QdpoError(
        f"{bad_steps} optimizer steps in a row had a non-finite loss or gradient (last at step "
        f"{step + 1}). Lower train.learning_rate, check the data, or use compute_dtype: bf16 "
        f"instead of fp16. The last good checkpoint in {run_dir / 'checkpoints'} is kept.")
