"""The run directory: what a run leaves on disk, and the rules for reusing one.

Layout (the directory itself is a peft adapter directory, so
`PeftModel.from_pretrained(base, run_dir)` works on it directly):

    adapter_config.json, adapter_model.safetensors, tokenizer files   final adapter
    adapter_manifest.json  size and sha256 of the final adapter's files (verified on loading)
    README.md          the model card: base, data, loss, steps, held-out metrics, how to load
    recipe.yaml        the resolved recipe (every key, defaults included)
    run.json           where the base weights and relative paths came from, data counts
    metrics.jsonl      one JSON object per logged step, eval records prefixed eval/
    summary.json       final train and eval metrics, time
    eval_margins.json  each held-out pair's reward margin at the final eval
    report.html        curves, margins, samples, recipe: one offline page (`qdpo report`)
    checkpoints/step-NNNNNNN/   adapter + optimizer/scheduler/RNG state, written atomically
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from qdpo import __version__
from qdpo.checkpoint import atomic_dir, list_checkpoints
from qdpo.errors import RunDirError, listed
from qdpo.files import write_text_atomically
from qdpo.recipe import Recipe, recipe_from_dict

# Keys a resumed run may change. Most change only speed, memory or what is logged and kept;
# train.max_steps and train.epochs change the run's length, and so the horizon of the
# learning-rate schedule: the resumed steps follow the new schedule, which an uninterrupted run
# of the old length would not have (the resume message says so).
LENGTH_KEYS = {"train.max_steps", "train.epochs"}
RESUME_SAFE = {
    "train.max_steps", "train.epochs", "train.micro_batch_pairs", "train.log_every_steps",
    "eval.every_steps", "eval.max_pairs", "eval.micro_batch_pairs", "output.save_every_steps",
    "output.keep_last", "output.tensorboard", "output.dir", "train.fsdp",
}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "columns":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def recipe_changes(old: Recipe, new: Recipe) -> list[str]:
    a, b = _flatten(old.to_dict()), _flatten(new.to_dict())
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _say_resume_changes(old: Recipe, new: Recipe) -> None:
    from qdpo import console as ui

    a, b = _flatten(old.to_dict()), _flatten(new.to_dict())
    changed = [k for k in recipe_changes(old, new) if k != "output.dir"]
    def shown(v: Any) -> str:  # as the recipe spells it (null, true), not Python (None)
        return json.dumps(v) if v is None or isinstance(v, bool) else str(v)

    for k in changed:
        ui.info(f"resume: {k} {shown(a.get(k))} -> {shown(b.get(k))}")
    if LENGTH_KEYS & set(changed):
        ui.info("resume: the run's length changed, so the learning-rate schedule now spans the "
                "new number of steps (the steps already taken are kept as they were)")


# A sweep directory (qdpo sweep) holds its runs and their record, read by sweep and report.
SWEEP_FILE = "sweep.json"


def read_sweep_record(sweep_dir: Path) -> dict[str, Any] | None:
    """A sweep directory's sweep.json, or None when it has none (or a damaged one)."""
    try:
        record = json.loads((sweep_dir / SWEEP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and isinstance(record.get("runs"), list) \
        and all(isinstance(r, dict) for r in record["runs"])
    return record if ok else None


# What a run directory holds: the final adapter and tokenizer files, the run's records,
# checkpoints, TensorBoard events, and the temporary names of atomic writes.
EVAL_MARGINS = "eval_margins.json"
LOCK = ".qdpo-train.lock"  # held (flock) by the training process; the OS frees it on exit
RUN_ENTRIES = {LOCK, "recipe.yaml", "run.json", "metrics.jsonl", "summary.json", "README.md",
               "train_pairs.fingerprints",
               "samples.jsonl", "eval_margins.json", "report.html",
               "checkpoints", "tensorboard", "wandb", "special_tokens_map.json",
               "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json"}
RUN_PREFIXES = ("adapter_", "tokenizer", ".final-adapter")
# The final adapter's record: size and sha256 of each of its files (the model card, rewritten
# after it, excepted), moved in just before adapter_config.json. Its name is no peft file's, so
# the run directory stays a plain peft adapter directory.
FINAL_MANIFEST = "adapter_manifest.json"
RECIPE_HEADER = "# resolved recipe of this run (qdpo "
# What an attempt that never reached its first checkpoint leaves besides recipe.yaml and
# run.json (both rewritten): cleared when --resume starts it again.
ATTEMPT_RECORDS = ("metrics.jsonl", "summary.json", EVAL_MARGINS, "samples.jsonl", "report.html",
                   "tensorboard")


_HELD: dict[Path, int] = {}  # run directories this process holds the lock of


def _try_lock(path: Path, keep: bool) -> int | None:
    """An exclusive lock on `path` without waiting: the open descriptor (kept open to hold
    it, with this process id written in), or None when another process holds it."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    if not keep:
        os.close(fd)  # closing releases the probe's lock
        return 1
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def _is_run_entry(name: str) -> bool:
    atomic_temporary = name.startswith(".") and (".tmp-" in name or ".old-" in name)
    return name in RUN_ENTRIES or name.startswith(RUN_PREFIXES) or atomic_temporary


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        # on resume: the previous attempt's number of steps when this one keeps the length
        self._resumed_total: int | None = None

    # -- what is there ---------------------------------------------------------------
    def is_run(self) -> bool:
        """A directory qdpo train wrote: its run.json is qdpo's (a JSON object naming the qdpo
        version that wrote it), not merely a file of that name."""
        info = self.info()
        return isinstance(info, dict) and "qdpo_version" in info and "recipe_dir" in info

    def is_started(self) -> bool:
        """A run killed between writing its recipe.yaml (qdpo's, by its header) and its
        run.json: nothing else of it exists yet."""
        if (self.path / "run.json").exists():
            return False
        try:
            with (self.path / "recipe.yaml").open("rb") as f:
                head = f.read(len(RECIPE_HEADER))
        except OSError:
            return False
        return head == RECIPE_HEADER.encode()

    def _holds_anything(self) -> bool:
        """Anything but a lock file left by a process that ended."""
        return self.path.exists() and any(e.name != LOCK for e in self.path.iterdir())

    def unexpected_entries(self) -> list[str]:
        """What in the directory a qdpo run does not write (user files an overwrite would
        destroy)."""
        return sorted(e.name for e in self.path.iterdir() if not _is_run_entry(e.name))

    def info(self) -> dict[str, Any]:
        try:
            info = json.loads((self.path / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):  # absent, unreadable, not JSON, not UTF-8
            return {}
        return info if isinstance(info, dict) else {}

    def recipe(self) -> Recipe:
        try:
            raw = yaml.safe_load((self.path / "recipe.yaml").read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError) as e:  # ValueError: not UTF-8
            raise RunDirError(f"'{self.path}' has no readable recipe.yaml ({e}); is it a qdpo "
                              "run directory?") from None
        return recipe_from_dict(raw, base_dir=self.info().get("recipe_dir", ""))

    # -- starting and resuming ---------------------------------------------------------
    def prepare_for_training(self, recipe: Recipe, resume: str | None,
                             overwrite: bool) -> Path | None:
        """Create or check the directory, and hold its lock for as long as this process
        trains; return the checkpoint to resume from, if any."""
        self._refuse_if_locked()
        ckpt = self._prepare(recipe, resume, overwrite)
        self._lock()
        from qdpo import console as ui
        from qdpo.checkpoint import remove_stale_temporaries

        stale = remove_stale_temporaries(self.path)  # ours now: no other process writes here
        if stale:
            ui.info(f"removed {len(stale)} temporary folder(s) of an earlier, killed save "
                    f"({', '.join(p.name for p in stale[:3])})")
        return ckpt

    # -- one training process per directory ----------------------------------------------
    def _refuse_if_locked(self) -> None:
        """Two runs writing one directory would interleave checkpoints and metrics."""
        self.unlock()  # a run this process trained here before (it ended, or failed)
        if (self.path / LOCK).exists() and not _try_lock(self.path / LOCK, keep=False):
            holder = (self.path / LOCK).read_text(errors="replace").strip() or "?"
            raise RunDirError(f"Another qdpo train is running in '{self.path}' (process "
                              f"{holder}). Wait for it to finish, stop it, or choose another "
                              "output.dir.")

    def _lock(self) -> None:
        fd = _try_lock(self.path / LOCK, keep=True)
        if fd is not None:
            _HELD[self.path.resolve()] = fd

    def unlock(self) -> None:
        fd = _HELD.pop(self.path.resolve(), None)
        if fd is not None:
            os.close(fd)

    def _prepare(self, recipe: Recipe, resume: str | None, overwrite: bool) -> Path | None:
        if resume:
            ckpt = self._resume_point(resume)
            if ckpt is not None:
                changed = [k for k in recipe_changes(self.recipe(), recipe)
                           if k not in RESUME_SAFE]
                if changed:
                    raise RunDirError(
                        f"Cannot resume {self.path}: the recipe changed in keys that change "
                        f"the result: {', '.join(changed)}. Put them back, or start a new run "
                        "(another output.dir, or --overwrite).")
                self._refuse_finished(recipe)
                _say_resume_changes(self.recipe(), recipe)
                total = self.info().get("total_steps")
                if isinstance(total, int) and not LENGTH_KEYS & set(
                        recipe_changes(self.recipe(), recipe)):
                    self._resumed_total = total
                return ckpt
            if self.is_run() and resume != "auto":
                raise RunDirError(f"No checkpoint to resume at '{resume}'.")
            if self.is_run() or self.is_started():
                self._start_again(recipe)
                return None
            if not self._holds_anything():
                from qdpo import console as ui

                ui.info(f"resume: nothing to resume in {self.path} (no run there yet); "
                        "starting a new run")
        if self._holds_anything():
            if not overwrite:
                if resume and not (self.is_run() or self.is_started()):
                    raise RunDirError(
                        f"Nothing to resume in '{self.path}': it holds files, but no qdpo run "
                        f"({listed(sorted(e.name for e in self.path.iterdir()))}). Set "
                        "output.dir to a new path.")
                what = "a qdpo run" if self.is_run() or self.is_started() else "other files"
                raise RunDirError(
                    f"Output directory '{self.path}' already holds {what}. Use --overwrite to "
                    "replace it, --resume to continue it, or set output.dir to a new path.")
            if not self.is_run() and not self.is_started():
                raise RunDirError(f"Refusing to --overwrite '{self.path}': it is not a qdpo run "
                                  "directory. Choose another output.dir.")
            extra = self.unexpected_entries()
            if extra:
                raise RunDirError(
                    f"Refusing to --overwrite '{self.path}': besides a qdpo run it holds files "
                    f"qdpo did not write: {listed(extra)}. Move them out, or choose another "
                    "output.dir.")
            here = self.path.resolve()
            inputs = [Path(recipe.base_dir)] + [
                Path(recipe.resolve_path(x)).resolve() for x in
                [recipe.model.name_or_path] + [s.path for s in recipe.data.train + recipe.eval.data]
                if Path(recipe.resolve_path(x)).exists()]
            if any(here == p or here in p.parents for p in inputs if str(p) not in ("", ".")):
                raise RunDirError(f"Refusing to --overwrite '{self.path}': it holds this run's "
                                  "recipe, model or data. Choose another output.dir.")
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        return None

    def _start_again(self, recipe: Recipe) -> None:
        """--resume of a run stopped before its first checkpoint (killed in the first steps, in
        the reference pass, or between writing recipe.yaml and run.json): with the same recipe,
        it starts again from step 0 here, clearing what the stopped attempt logged."""
        from qdpo import console as ui

        changed = [k for k in recipe_changes(self.recipe(), recipe) if k not in RESUME_SAFE]
        if changed:
            raise RunDirError(
                f"Cannot resume {self.path}: it holds a run stopped before its first checkpoint, "
                f"and the recipe changed in keys that change the result: {', '.join(changed)}. "
                "Put them back to start it again here, or start a new run (another output.dir, "
                "or --overwrite).")
        if (self.path / "adapter_config.json").exists():
            raise RunDirError(
                f"'{self.path}' holds a final adapter but no checkpoint to continue from "
                "(checkpoints/ was removed?). Use --overwrite to train it again from the start, "
                "or set output.dir to a new path.")
        f = self.path / "metrics.jsonl"
        logged = metric_lines(f.read_bytes(), sys.maxsize)[0] if f.is_file() else []
        steps = sum('"loss"' in x for x in logged)
        why = (f"it stopped after {steps} logged step{'s' if steps != 1 else ''}, before its "
               "first checkpoint" if steps else "it stopped before its first checkpoint")
        ui.info(f"resume: {self.path} holds no checkpoint ({why}): starting it again from step 0 "
                "with the same recipe")
        for name in ATTEMPT_RECORDS:
            p = self.path / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()

    def _refuse_finished(self, recipe: Recipe) -> None:
        """A finished run continues only when asked for more steps (max_steps or epochs)."""
        try:
            summary = json.loads((self.path / "summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):  # not JSON, not UTF-8
            return  # interrupted or killed before the end: nothing finished
        if not isinstance(summary, dict) or summary.get("interrupted"):
            return
        if LENGTH_KEYS & set(recipe_changes(self.recipe(), recipe)):
            return
        steps = summary.get("steps", 0)
        raise RunDirError(
            f"'{self.path}' is a finished run ({steps} steps): there is nothing to resume. To "
            f"train it further, resume with more steps (e.g. train.max_steps={2 * steps} or "
            "more train.epochs); to start again, use --overwrite.")

    def _resume_point(self, resume: str) -> Path | None:
        """The checkpoint to resume from: the newest intact one (damaged newer ones are named
        and skipped), or the one `resume` names, which must be intact."""
        if resume == "auto":
            return newest_intact_checkpoint(self.path)
        p = Path(resume)
        if p.name.startswith("step-") and p.is_dir():
            return verified_checkpoint(p)
        ckpt = newest_intact_checkpoint(p)
        if ckpt is None:
            raise RunDirError(f"No complete checkpoint found at '{resume}'.")
        return ckpt

    # -- writing ---------------------------------------------------------------------------
    def write_run_info(self, recipe: Recipe, minfo: Any, data: Any, steps: int) -> None:
        header = (f"{RECIPE_HEADER}{__version__}); relative paths are "
                  f"looked up from recipe_dir in run.json\n")
        write_text_atomically(self.path / "recipe.yaml", header + recipe.to_yaml())
        info = {
            "qdpo_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "recipe_dir": recipe.base_dir, "base_model": minfo.base_path,
            "random_init": recipe.model.random_init, "device": str(minfo.device),
            "compute_dtype": str(minfo.dtype).removeprefix("torch."),
            "reference": minfo.reference, "trainable_params": minfo.trainable_params,
            # what trains: with lora.init_adapter these are the adapter's, not the recipe's
            "lora": {"r": minfo.lora_r, "alpha": minfo.lora_alpha,
                     "dropout": minfo.lora_dropout},
            "train_pairs": len(data.train), "eval_pairs": len(data.eval), "total_steps": steps,
            "data": data.train_report.summary(),
        }
        write_text_atomically(self.path / "run.json", json.dumps(info, indent=2))

    def write_eval_margins(self, step: int, margins: list[float]) -> None:
        """The final eval's per-pair reward margins (evaluate_pairs_with_margins), for the
        report's histogram: one small file, a float per held-out pair, not a log of every
        eval (the curves already hold the means)."""
        record = {"step": step, "pairs": len(margins),
                  "margins": [float(f"{m:.6g}") for m in margins]}
        write_text_atomically(self.path / EVAL_MARGINS, json.dumps(record))

    def eval_margins(self) -> tuple[int, list[float]] | None:
        """(step, margins) of the last final eval, or None when none is stored or readable."""
        try:
            record = json.loads((self.path / EVAL_MARGINS).read_text(encoding="utf-8"))
            step, raw = record["step"], record["margins"]
            margins = [float(m) for m in raw if isinstance(m, (int, float))
                       and not isinstance(m, bool)]
        except (OSError, ValueError, TypeError, KeyError, RecursionError):
            return None
        return (step, margins) if isinstance(step, int) and margins else None

    def truncate_metrics(self, step: int, total: int | None = None) -> None:
        """Drop records after `step`: a resumed run logs those steps again. The file is a log,
        not the run's state: damaged lines are counted, reported once and dropped.

        Resumed at its last step (`total`, the resumed run's number of steps; by default the
        stopped attempt's when the recipe kept the run's length), the run only evaluates
        again: the final eval records at `step` (and the sample answers given with them) are
        dropped too, so that they are not logged twice."""
        from qdpo import console as ui

        total = total if total is not None else self._resumed_total
        final = total is not None and step >= total
        f = self.path / "metrics.jsonl"
        if f.exists():
            keep, damaged = metric_lines(f.read_bytes(), step, redo_eval=final)
            if damaged:
                ui.warn(f"{f}: {damaged} damaged line{'s' if damaged > 1 else ''} skipped (not "
                        "UTF-8, not a JSON object, or a step that is not an integer); it is only "
                        "a log, the run resumes from its checkpoint")
            write_text_atomically(f, "".join(x + "\n" for x in keep))
        samples = self.path / "samples.jsonl"
        if final and samples.exists():  # every record there is an eval's
            keep, _ = metric_lines(samples.read_bytes(), step - 1)
            write_text_atomically(samples, "".join(x + "\n" for x in keep))

    def save_final(self, save_adapter: Callable[[Path], None]) -> None:
        """The final adapter: written whole under a temporary name with its manifest (size and
        sha256 of each file, what `verify_adapter_dir` checks), then its files moved in, the
        manifest next to last and adapter_config.json last (its presence is what marks the run
        as finished). Files moved in from two saves (a kill in the middle) fail the check."""
        def write(d: Path) -> None:
            save_adapter(d)
            write_final_manifest(d)

        tmp = self.path / ".final-adapter"
        atomic_dir(tmp, write)
        order = {FINAL_MANIFEST: 1, "adapter_config.json": 2}
        for f in sorted(tmp.iterdir(), key=lambda f: order.get(f.name, 0)):
            f.replace(self.path / f.name)
        tmp.rmdir()

    def write_summary(self, result: Any, seconds: float, recipe: Recipe) -> None:
        from qdpo import console as ui

        summary = {"steps": result.steps, "seconds": round(seconds, 2),
                   "interrupted": result.interrupted, "train": result.last_train,
                   "reference": ("none" if not recipe.needs_reference else
                                 recipe.train.reference if recipe.train.reference == "online"
                                 else "precompute"),
                   "reference_seconds": round(result.reference_seconds, 3),
                   "reference_reused": result.reference_reused,
                   "tokens_per_s_average": ui.average_tokens_per_s(result.history),
                   "eval": result.final_eval, "loss": recipe.loss_types}
        write_text_atomically(self.path / "summary.json", json.dumps(summary, indent=2))


# ---------------------------------------------------------------------------------------
# What the after-training commands read: a run directory, a checkpoint, or a bare adapter
# ---------------------------------------------------------------------------------------

class TrainedSource:
    """An adapter and everything needed to rebuild its model: base weights and recipe.

    `adapter_dir` is None for a plain model directory (a merged model, any transformers model):
    then `base_path` is the model itself and there is no reference to compare it with.
    """

    def __init__(self, adapter_dir: Path | None, recipe: Recipe, base_path: str,
                 run: RunDir | None):
        self.adapter_dir = adapter_dir
        self.recipe = recipe
        self.base_path = base_path
        self.run = run
        self.verified = adapter_dir is None

    def verify(self) -> None:
        """Check the adapter's files before anything computes with them (once)."""
        if not self.verified and self.adapter_dir is not None:
            verify_adapter_dir(self.adapter_dir)
        self.verified = True

    @property
    def has_adapter(self) -> bool:
        return self.adapter_dir is not None

    @property
    def name(self) -> str:
        return (self.adapter_dir or Path(self.base_path)).name


def open_trained(path: str | Path, allow_plain: bool = False,
                 trust_remote_code: bool = False) -> TrainedSource:
    """Resolve a run dir, a checkpoint dir inside one, or a plain peft adapter directory; with
    `allow_plain`, also a plain model directory (merged, or any transformers model).

    Code from a model's repository runs only when the caller says so (`--trust-remote-code`
    on the command line): a run directory received from someone else must not run code by
    being opened, whatever its recipe.yaml says."""
    src = _open_trained(path, allow_plain)
    src.verify()  # before any model is loaded: a damaged file is named, not computed with
    if src.run is not None and src.recipe.model.trust_remote_code and not trust_remote_code:
        raise RunDirError(f"'{path}' was trained with model.trust_remote_code: true, so loading "
                          "its model runs code from the model's repository. Pass "
                          "--trust-remote-code to allow that.")
    src.recipe.model.trust_remote_code = trust_remote_code
    return src


def write_final_manifest(adapter_dir: Path) -> None:
    """FINAL_MANIFEST in `adapter_dir`: size and sha256 of each file there but the model card."""
    from qdpo.checkpoint import sha256

    files = {f.name: {"size": f.stat().st_size, "sha256": sha256(f)}
             for f in sorted(adapter_dir.iterdir())
             if f.is_file() and f.name not in (FINAL_MANIFEST, "README.md")}
    record = {"qdpo_version": __version__, "files": files}
    write_text_atomically(adapter_dir / FINAL_MANIFEST, json.dumps(record, indent=1))


def verify_adapter_dir(adapter_dir: Path) -> None:
    """A damaged adapter is named before any command computes with it (a garbled one once gave
    eval accuracy 0.0, margin NaN and exit 0): a checkpoint against its checkpoint.json, a
    run's final adapter against its manifest, each file's size and sha256; any adapter (a
    plain peft one has no record) by its safetensors header."""
    from qdpo import checkpoint as ck

    p = Path(adapter_dir)
    try:
        if (p / ck.META).exists():
            ck.verify(p)
        elif (p / FINAL_MANIFEST).exists():
            _verify_final(p)
    except ck.CheckpointError as e:
        raise RunDirError(_damaged_message(p, str(e))) from None
    _check_adapter_weights(p)


def _verify_final(adapter_dir: Path) -> None:
    from qdpo import checkpoint as ck

    f = adapter_dir / FINAL_MANIFEST
    try:
        listed = json.loads(f.read_bytes().decode("utf-8"))["files"]
        if not isinstance(listed, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ck.CheckpointError(f"{f} is unreadable ({type(e).__name__})") from None
    ck._check_files(adapter_dir, listed)


def _damaged_message(adapter_dir: Path, why: str) -> str:
    """One message: what is damaged and why, and what to use instead."""
    from qdpo import checkpoint as ck

    if ck.step_of(adapter_dir) is not None or (adapter_dir / ck.META).exists():
        what, run_root = f"The checkpoint '{adapter_dir}'", (
            adapter_dir.parent.parent if adapter_dir.parent.name == ck.CKPT_DIR else None)
    else:
        what, run_root = f"The final adapter in '{adapter_dir}'", adapter_dir
    hint = "Restore it from a copy, or train again."
    if run_root is not None and (run_root / ck.CKPT_DIR).is_dir():
        good = _newest_intact_checkpoint(run_root)
        other = "another checkpoint" if what.startswith("The checkpoint") else "a checkpoint"
        hint = (f"Use {other} of the run instead, e.g. its newest intact one: '{good}'."
                if good is not None else
                f"No intact checkpoint is left under '{run_root / ck.CKPT_DIR}': restore the "
                "run from a copy, or train again.")
    return f"{what} is damaged: {why}. {hint}"


def _intact(ckpt: Path) -> bool:
    from qdpo.checkpoint import CheckpointError, verify

    try:
        verify(ckpt)
    except CheckpointError:
        return False
    return True


def _check_adapter_weights(adapter_dir: Path) -> None:
    """What a plain adapter without a record allows: the safetensors header is whole and lists
    tensors (a cut or zeroed file)."""
    from safetensors import safe_open

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.exists():
        return
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            names = list(f.keys())
    except Exception as e:  # truncated, zeroed, not safetensors at all
        raise RunDirError(f"'{weights}' is damaged ({type(e).__name__}: {str(e)[:200]}). "
                          "Use a checkpoint of the run (checkpoints/step-*), or train "
                          "again.") from None
    if not names:
        raise RunDirError(f"'{weights}' holds no tensors: it is damaged.")


def open_model_source(path: str | Path, trust_remote_code: bool = False) -> TrainedSource:
    """Anything a model can generate from: what `open_trained(allow_plain=True)` opens, a
    recipe YAML (the policy training would start from: its base, plus lora.init_adapter when
    it has one), or a hub id such as org/name."""
    p = Path(path)
    if p.is_file() and p.suffix in (".yaml", ".yml"):
        from qdpo.model import base_weights_path
        from qdpo.recipe import load_recipe

        recipe = load_recipe(p)  # the user's own recipe: its trust_remote_code is theirs
        recipe.model.trust_remote_code = recipe.model.trust_remote_code or trust_remote_code
        init = recipe.lora.init_adapter
        return TrainedSource(Path(recipe.resolve_path(init)) if init else None, recipe,
                             base_weights_path(recipe), None)
    name = str(path)
    if not p.exists() and name.count("/") == 1 and not name.startswith((".", "/", "~")):
        recipe = Recipe.for_adapter(name)  # a hub id: loading says so if it is not there
        recipe.model.trust_remote_code = trust_remote_code
        return TrainedSource(None, recipe, name, None)
    if not p.exists():
        raise RunDirError(f"Model '{path}' does not exist. Pass a qdpo run directory, a "
                          "checkpoint or peft adapter, a model directory, a recipe YAML or a "
                          "hub id (org/name).")
    return open_trained(p, allow_plain=True, trust_remote_code=trust_remote_code)


def _newest_intact_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose files match its manifest (one being written, or damaged,
    is passed over)."""
    return next((c for c in reversed(list_checkpoints(run_dir)) if _intact(c)), None)


def _open_trained(path: str | Path, allow_plain: bool) -> TrainedSource:
    p = Path(path)
    if not p.exists():
        kinds = ["a qdpo run directory (what `qdpo train` wrote)", "a checkpoint",
                 "a peft adapter directory"]
        if allow_plain:  # chat and generate
            kinds += ["a merged model directory", "any transformers model directory"]
        raise RunDirError(f"'{path}' does not exist. Pass {', '.join(kinds[:-1])} or "
                          f"{kinds[-1]}.")
    if not (p / "adapter_config.json").exists():
        if RunDir(p).is_run():
            newest = _newest_intact_checkpoint(p)
            if newest is None:
                raise RunDirError(f"'{path}' is a qdpo run without a final adapter or an intact "
                                  "checkpoint yet (interrupted early, or still starting). "
                                  "Resume it, or wait for its first checkpoint.")
            from qdpo import console as ui

            ui.info(f"'{path}' has no final adapter yet (still training, or interrupted): "
                    f"using its newest checkpoint, {newest.name}")
            src = _open_trained(newest, allow_plain)
            src.verified = True  # just verified, when it was picked
            return src
        if (p / "config.json").is_file():  # a transformers model: merged, or any other
            if allow_plain:
                base = str(p.resolve())
                return TrainedSource(None, Recipe.for_adapter(base), base, None)
            raise RunDirError(f"'{path}' is a plain model directory (no adapter_config.json); "
                              "this command needs a qdpo run directory or a peft adapter.")
        raise RunDirError(f"'{path}' is neither a qdpo run directory, a peft adapter directory "
                          "nor a model directory (no adapter_config.json or config.json).")
    run_root = p if RunDir(p).is_run() else (
        p.parent.parent if p.parent.name == "checkpoints" and RunDir(p.parent.parent).is_run()
        else None)
    try:
        adapter_cfg = json.loads((p / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # not JSON, not UTF-8
        raise RunDirError(f"'{p / 'adapter_config.json'}' is unreadable: {e}") from None
    if run_root is not None:
        run = RunDir(run_root)
        recipe = run.recipe()
        if recipe.model.random_init:
            # seeded weights from the config: rebuilt if the cache was cleared
            from qdpo.model import base_weights_path

            return TrainedSource(p, recipe, base_weights_path(recipe), run)
        base = run.info().get("base_model") or adapter_cfg.get("base_model_name_or_path", "")
        recipe.model.name_or_path = base
        return TrainedSource(p, recipe, base, run)
    base = adapter_cfg.get("base_model_name_or_path")
    if not base:
        raise RunDirError(f"The adapter in '{path}' does not say which base model it belongs "
                          "to (base_model_name_or_path is empty).")
    return TrainedSource(p, Recipe.for_adapter(base), base, None)


# ---------------------------------------------------------------------------------------
# Resuming from what is on disk: checkpoints that verify, metrics that parse
# ---------------------------------------------------------------------------------------

def newest_intact_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of `run_dir` that verifies, or None when it has none at all.

    Each damaged newer checkpoint is named with the file and the reason, and left in place
    (training past its step replaces it); entries that are not checkpoints are noted and
    ignored. Raises RunDirError when checkpoints exist but none is intact.
    """
    from qdpo import checkpoint as ck
    from qdpo import console as ui

    steps, strays = ck.scan(run_dir)
    for stray in strays:
        ui.info(f"resume: ignoring '{stray}': not a checkpoint (qdpo names them step-NNNNNNN)")
    damaged = []
    for ckpt in reversed(steps):
        try:
            hashed = ck.verify(ckpt)
        except ck.CheckpointError as e:
            ui.warn(f"resume: checkpoint {ckpt.name} is damaged and skipped: {e}")
            damaged.append(ckpt.name)
            continue
        _note_unverified(ckpt, hashed)
        if damaged:
            ui.warn(f"resume: falling back to {ckpt.name}, the newest intact checkpoint; the "
                    f"steps after {ck.step_of(ckpt)} are trained again")
        return ckpt
    if damaged:
        raise RunDirError(
            f"No intact checkpoint to resume in '{run_dir / ck.CKPT_DIR}': "
            f"{', '.join(reversed(damaged))} {'is' if len(damaged) == 1 else 'are'} damaged "
            "(see above). Restore them from a backup, or start again with --overwrite.")
    return None


def verified_checkpoint(path: Path) -> Path:
    """A checkpoint named on the command line: used only if it verifies."""
    from qdpo import checkpoint as ck

    try:
        hashed = ck.verify(path)
    except ck.CheckpointError as e:
        raise RunDirError(f"Cannot resume from damaged checkpoint '{path}': {e}. Resume from "
                          "an older checkpoint, or from the run directory (--resume picks the "
                          "newest intact one).") from None
    _note_unverified(path, hashed)
    return path


def _note_unverified(ckpt: Path, hashed: bool) -> None:
    if not hashed:
        from qdpo import console as ui

        ui.info(f"resume: {ckpt} was written by an older qdpo without checksums: it cannot be "
                "verified, only checked for missing or cut files")


def metric_lines(data: bytes, step: int, redo_eval: bool = False) -> tuple[list[str], int]:
    """The lines of a metrics.jsonl with a step <= `step`, and how many lines are damaged.
    A last line without its newline was cut by a kill: dropped without counting it.
    `redo_eval`: the eval records of `step` itself are dropped too (it is evaluated again)."""
    lines = data.split(b"\n")
    keep, damaged = [], 0
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        record = _metric_record(raw)
        if record is None:
            damaged += i < len(lines) - 1
            continue
        at = record.get("step", 0)
        if at < step or at == step and not (
                redo_eval and any(k.startswith("eval/") for k in record)):
            keep.append(raw.decode("utf-8"))
    return keep, damaged


def _metric_record(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    step = record.get("step", 0)
    return record if isinstance(step, int) and not isinstance(step, bool) else None
