"""Checkpoints that are either complete or absent.

Each checkpoint is written into a temporary directory next to its final place and renamed when
everything (adapter, optimizer, scheduler, RNG states, position in the data, metric state) is on
disk, so a kill at any moment leaves the previous checkpoints usable. Its metadata
(checkpoint.json), written last, records its step and the size and sha256 of every other file,
so that `verify` can tell a checkpoint damaged later (a full disk, a bad copy, a file manager's
rename, bit rot) from an intact one before a resume trusts it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch

from qdpo import console as ui
from qdpo import distributed, files
from qdpo.errors import QdpoError

CKPT_DIR = "checkpoints"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
LEGACY_STATE = "trainer_state.pt"
META = "checkpoint.json"
ADAPTER = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
STEP_DIR = re.compile(r"step-(\d+)")


class CheckpointError(QdpoError):
    """A checkpoint on disk is damaged, or does not fit the model it is loaded into."""


def atomic_dir(final: Path, write: Any) -> None:
    """Call write(tmp_dir), then put it at `final` atomically (replacing an older one)."""
    try:
        with files.atomic_dir(final) as tmp:
            write(tmp)
    except Exception as e:
        if files.disk_full(e):
            raise QdpoError(disk_full_message(final)) from None
        raise


def disk_full_message(target: Path) -> str:
    """What a full disk while saving means for the run, and how to make room."""
    from qdpo.cache import cache_dir

    size = files.human_size
    run_dir = target.parent.parent if target.parent.name == CKPT_DIR else target.parent
    done = list_checkpoints(run_dir)
    need = files.folder_size(done[-1]) if done else 0
    cache = cache_dir()
    return (f"Disk full while writing '{target}'. "
            + (f"The previous checkpoint ({done[-1].name}) is intact: continue with qdpo train "
               "... --resume once there is room. " if done else "")
            + (f"A checkpoint takes about {size(need)}. " if need else "")
            + "Free some space: lower output.keep_last (fewer checkpoints kept), delete old "
            f"runs, or clear qdpo's cache ({cache}, {size(files.folder_size(cache))}; it is "
            "rebuilt when needed).")


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


def step_of(path: Path) -> int | None:
    """The step in a checkpoint directory's name (`step-0000008` -> 8); None for other names."""
    m = STEP_DIR.fullmatch(path.name)
    return int(m.group(1)) if m else None


def scan(run_dir: Path) -> tuple[list[Path], list[Path]]:
    """The `step-NNNNNNN` directories in checkpoints/, oldest first, complete or not, and the
    stray entries beside them (a folder a file manager copied, notes). Hidden names are writes
    in progress (or left by a kill) and belong to neither."""
    d = run_dir / CKPT_DIR
    if not d.is_dir():
        return [], []
    steps, strays = [], []
    for p in d.iterdir():
        if not p.name.startswith("."):
            (steps if p.is_dir() and step_of(p) is not None else strays).append(p)
    return sorted(steps, key=lambda p: step_of(p) or 0), sorted(strays)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (their metadata written), oldest first; not yet verified."""
    return [p for p in scan(run_dir)[0] if (p / META).exists()]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file in `directory` but the metadata. Computed right after
    the files are written, while the OS still caches them: about a second per GB."""
    return {f.relative_to(directory).as_posix(): {"size": f.stat().st_size, "sha256": sha256(f)}
            for f in sorted(directory.rglob("*")) if f.is_file() and f.name != META}


def warn_if_low_on_space(run_dir: Path, keep_last: int) -> None:
    """Before a save: a warning when the disk has less room than the last checkpoint took
    (the next one is the same size), while there is still time to free some."""
    done = list_checkpoints(run_dir)
    if not done:
        return
    need = files.folder_size(done[-1])
    try:
        free = shutil.disk_usage(run_dir).free
    except OSError:
        return
    if free < need * 1.1:
        size = files.human_size
        ui.warn(f"only {size(free)} free on the disk of {run_dir}; the next checkpoint "
                f"needs about {size(need)}. Free some space, or lower output.keep_last "
                f"(now {keep_last}); the checkpoints written so far stay usable.")


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Temporary folders and files of saves that a killed process left (`.NAME.tmp-PID`,
    `.NAME.old-PID`, gigabytes on a real model) in `directory` and its checkpoints/, when
    that process is gone; returns what was removed."""
    removed = []
    for parent in (directory, directory / CKPT_DIR):
        if parent.is_dir():
            removed += files.remove_stale_temporaries(parent.iterdir())
    return removed


def save(run_dir: Path, step: int, model: Any, tokenizer: Any, optimizer: Any, scheduler: Any,
         scaler: Any, objective: Any, keep_last: int,
         whole: tuple[dict[str, torch.Tensor] | None, dict[str, Any]] | None = None) -> Path:
    """Write checkpoint `step` atomically and keep the newest `keep_last`; returns its path.
    `whole`: the adapter and optimizer states gathered whole from the ranks of a sharded model
    (distributed.full_adapter_state / full_optimizer_state), written as one process's."""
    from qdpo.model import save_adapter

    final = checkpoint_path(run_dir, step)
    warn_if_low_on_space(run_dir, keep_last)
    adapter_state, optimizer_state = whole or (None, optimizer.state_dict())

    def write(tmp: Path) -> None:
        save_adapter(model, tokenizer, tmp, adapter_state)
        write_state({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict() if scaler is not None else None,
                     "objective": objective.state_dict(), "rng": rng_state(),
                     "trainer": {"step": step}}, tmp)
        meta = {"step": step, "files": manifest(tmp)}
        (tmp / META).write_text(json.dumps(meta, indent=1))  # last: marks it complete

    atomic_dir(final, write)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------
# verification: is a checkpoint on disk what was saved?
# ---------------------------------------------------------------------------------------

def verify(path: Path) -> bool:
    """Raise CheckpointError naming the first damaged file of checkpoint `path` and why.

    Checks every recorded file's presence, size and sha256, and that the step in the metadata
    is the directory name's and the trainer state's. Returns False for a checkpoint written
    before qdpo recorded hashes: only its files' presence and structure can be checked.
    """
    meta = _read_meta(path)
    step, named = meta.get("step"), step_of(path)
    if not _is_int(step):
        raise CheckpointError(f"{path / META} records no step ({step!r})")
    if named is not None and named != step:
        raise CheckpointError(f"{path / META} says step {step}, but the directory is named "
                              f"{path.name} (renamed or copied over?)")
    listed = meta.get("files")
    if listed is None:
        _check_structure(path)
    else:
        _check_files(path, listed)
    state_step = _state_step(path)
    if state_step is not None and state_step != step:
        raise CheckpointError(f"{path / STATE_JSON} holds step {state_step}, but {META} says "
                              f"step {step}")
    return listed is not None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _read_meta(path: Path) -> dict[str, Any]:
    f = path / META
    if not f.exists():
        raise CheckpointError(f"{f} is missing (the checkpoint was never completed)")
    try:
        meta = json.loads(f.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f} is unreadable ({files.short_error(e)})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{f} is not a checkpoint record")
    return meta


def _check_files(path: Path, listed: Any) -> None:
    try:
        records = [(name, int(r["size"]), str(r["sha256"])) for name, r in listed.items()]
        if any(Path(name).is_absolute() or ".." in Path(name).parts for name, _, _ in records):
            raise ValueError("a file outside the checkpoint")
    except (AttributeError, KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path / META} has an unreadable list of files") from None
    for name, size, digest in records:
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing")
        actual = f.stat().st_size
        if actual != size:
            raise CheckpointError(f"{f} is {actual:,} bytes, {size:,} when saved "
                                  f"({'truncated' if actual < size else 'written to since'})")
        if sha256(f) != digest:
            raise CheckpointError(f"{f} changed since it was saved (its sha256 differs)")


def _check_structure(path: Path) -> None:
    """What can be checked without hashes: the files are there and their framing is whole
    (safetensors headers cover the file, json parses, a torch zip's CRCs match)."""
    state = [STATE_JSON, STATE_TENSORS] if (path / STATE_JSON).exists() else [LEGACY_STATE]
    for name in [ADAPTER, ADAPTER_CONFIG, *state]:
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing")
        with _reading(f):
            if name.endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(str(f), "pt"):
                    pass
            elif name.endswith(".json"):
                json.loads(f.read_bytes().decode("utf-8"))
            else:
                with zipfile.ZipFile(f) as z:
                    bad = z.testzip()
                    if bad:
                        raise ValueError(f"member {bad} fails its CRC")


def _state_step(path: Path) -> int | None:
    """The step in the trainer state, without loading its tensors (None for qdpo 0.1.0's torch
    file, whose step restore checks)."""
    f = path / STATE_JSON
    if not f.exists():
        return None
    with _reading(f):
        step = json.loads(f.read_bytes().decode("utf-8"))["trainer"]["step"]
    if not _is_int(step):
        raise CheckpointError(f"{f} records no step ({step!r})")
    return step


@contextlib.contextmanager
def _reading(f: Path) -> Iterator[None]:
    """Any failure while reading `f` becomes one line naming it."""
    try:
        yield
    except QdpoError:
        raise
    except Exception as e:
        raise CheckpointError(f"{f} is unreadable ({files.short_error(e)})") from e


def check_fits(path: Path, model: Any, weights: dict[str, torch.Tensor]) -> None:
    """Refuse an adapter of another shape (LoRA rank, target modules) with one message, before
    peft prints a `size mismatch` per tensor or silently skips the modules it does not know."""
    from peft import get_peft_model_state_dict

    want = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    if want == {k: tuple(v.shape) for k, v in weights.items()}:
        return
    try:
        saved = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError):
        saved = {}
    ours = model.peft_config["default"]
    raise CheckpointError(
        f"The adapter in '{path}' ({_lora_shape(saved.get('r'), saved.get('target_modules'))}) "
        f"does not fit this run's model ({_lora_shape(ours.r, ours.target_modules)}). Resume "
        "with the recipe that wrote the checkpoint (lora.r, lora.target_modules), or start a "
        "new run.")


def _lora_shape(r: Any, targets: Any) -> str:
    if isinstance(targets, (list, tuple, set)):
        names = sorted(str(t) for t in targets)
        more = f" and {len(names) - 8} more" if len(names) > 8 else ""
        targets = ", ".join(names[:8]) + more  # some adapters list every layer's module
    return f"LoRA r={r if r is not None else '?'} on {targets or 'unknown modules'}"


def restore(path: Path, model: Any, optimizer: Any, scheduler: Any, scaler: Any,
            objective: Any) -> int:
    """Load checkpoint `path` into the runtime objects; returns the step it was saved at.
    Call `verify` first: this only names the file that fails to load, it does not check it."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not (path / META).exists():
        raise QdpoError(f"'{path}' is not a complete qdpo checkpoint.")
    state_file = path / (STATE_JSON if (path / STATE_JSON).exists() else LEGACY_STATE)
    with _reading(state_file):
        state = read_state(path)
        step = state["trainer"]["step"]
    named = step_of(path)
    if not _is_int(step) or (named is not None and step != named):
        raise CheckpointError(f"{state_file} holds step {step!r}, but the directory is named "
                              f"{path.name}")
    with _reading(path / ADAPTER):
        weights = load_file(str(path / ADAPTER))
    check_fits(path, model, weights)
    sharded = distributed.is_sharded(model)
    if sharded:  # each rank cuts its shards from the whole tensors
        distributed.load_adapter_state(model, weights)
    else:
        set_peft_model_state_dict(model, weights, adapter_name="default")
    with _reading(state_file):
        opt_state = state["optimizer"]
        if sharded:
            opt_state = distributed.shard_optimizer_state(
                opt_state, [p for g in optimizer.param_groups for p in g["params"]])
        optimizer.load_state_dict(opt_state)
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        objective.load_state_dict(state.get("objective") or {})
        set_rng_state(state["rng"])
    return int(step)
