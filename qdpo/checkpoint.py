"""Checkpoints that are either complete or absent.

Each checkpoint is written into a temporary directory next to its final place and renamed when
everything (adapter, optimizer, scheduler, RNG states, position in the data, metric state) is on
disk, so a kill at any moment leaves the previous checkpoints usable.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from qdpo.errors import QdpoError

CKPT_DIR = "checkpoints"
STATE = "trainer_state.pt"
META = "checkpoint.json"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_dir(final: Path, write: Any) -> None:
    """Call write(tmp_dir), then rename tmp_dir to `final` (replacing an older one)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        write(tmp)
        _fsync_dir(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(final.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == 28:  # ENOSPC
            raise QdpoError(f"Disk full while writing '{final}'. The previous checkpoints are "
                            "untouched and usable (qdpo train --resume); free some space or "
                            "lower output.keep_last.") from None
        raise


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / CKPT_DIR / f"step-{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    d = run_dir / CKPT_DIR
    if not d.is_dir():
        return []
    done = [p for p in d.iterdir() if p.name.startswith("step-") and (p / META).exists()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(run_dir: Path, step: int, save_adapter: Any, optimizer: Any, scheduler: Any,
                    trainer_state: dict[str, Any], keep_last: int) -> Path:
    final = checkpoint_path(run_dir, step)

    def write(tmp: Path) -> None:
        save_adapter(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng_state(), "trainer": trainer_state}, tmp / STATE)
        (tmp / META).write_text(json.dumps({"step": step}))

    atomic_dir(final, write)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not (path / META).exists() or not (path / STATE).exists():
        raise QdpoError(f"'{path}' is not a complete qdpo checkpoint.")
    return torch.load(path / STATE, map_location="cpu", weights_only=False)
