"""Checkpoints that are either complete or absent.

Each checkpoint is written into a temporary directory next to its final place and renamed when
everything (adapter, optimizer, scheduler, RNG states, position in the data, metric state) is on
disk, so a kill at any moment leaves the previous checkpoints usable.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from qdpo import files
from qdpo.errors import QdpoError

CKPT_DIR = "checkpoints"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
LEGACY_STATE = "trainer_state.pt"
META = "checkpoint.json"


def atomic_dir(final: Path, write: Any) -> None:
    """Call write(tmp_dir), then put it at `final` atomically (replacing an older one)."""
    try:
        with files.atomic_dir(final) as tmp:
            write(tmp)
    except OSError as e:
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
    py = state["python"]  # json gives lists; random.setstate wants the original tuples
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# ---------------------------------------------------------------------------------------
# Trainer state in formats that cannot run code when read: tensors in safetensors, the rest
# (numbers, strings, lists, dicts with any keys) in json with tagged tuples and tensor slots.
# ---------------------------------------------------------------------------------------

def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        # the same tensor may appear several times (bitsandbytes' 8-bit optimizers share one
        # quantization map between parameters): store it once; safetensors refuses shared memory
        key = f"t{obj.device}:{obj.data_ptr()}:{obj.dtype}:{tuple(obj.shape)}:{obj.stride()}"
        if key not in tensors:
            tensors[key] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def write_state(state: dict[str, Any], directory: Path) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors)
    save_file(tensors, str(directory / STATE_TENSORS))
    (directory / STATE_JSON).write_text(json.dumps(tree))


def read_state(directory: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    if (directory / STATE_JSON).exists():
        tensors = load_file(str(directory / STATE_TENSORS))
        return _decode(json.loads((directory / STATE_JSON).read_text()), tensors)
    # checkpoints of qdpo 0.1.0: a torch file, read without unpickling arbitrary objects
    return torch.load(directory / LEGACY_STATE, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------
# save / restore
# ---------------------------------------------------------------------------------------

def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / CKPT_DIR / f"step-{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    d = run_dir / CKPT_DIR
    if not d.is_dir():
        return []
    done = [p for p in d.iterdir() if p.name.startswith("step-") and (p / META).exists()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def save(run_dir: Path, step: int, model: Any, tokenizer: Any, optimizer: Any, scheduler: Any,
         scaler: Any, objective: Any, keep_last: int) -> Path:
    """Write checkpoint `step` atomically and keep the newest `keep_last`; returns its path."""
    from qdpo.model import save_adapter

    final = checkpoint_path(run_dir, step)

    def write(tmp: Path) -> None:
        save_adapter(model, tokenizer, tmp)
        write_state({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict() if scaler is not None else None,
                     "objective": objective.state_dict(), "rng": rng_state(),
                     "trainer": {"step": step}}, tmp)
        (tmp / META).write_text(json.dumps({"step": step}))  # last: marks it complete

    atomic_dir(final, write)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def restore(path: Path, model: Any, optimizer: Any, scheduler: Any, scaler: Any,
            objective: Any) -> int:
    """Load checkpoint `path` into the runtime objects; returns the step it was saved at."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not (path / META).exists():
        raise QdpoError(f"'{path}' is not a complete qdpo checkpoint.")
    state = read_state(path)
    set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")),
                              adapter_name="default")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    objective.load_state_dict(state.get("objective") or {})
    set_rng_state(state["rng"])
    return int(state["trainer"]["step"])
