"""The run directory: what a run leaves on disk, and the rules for reusing one.

Layout (the directory itself is a peft adapter directory, so
`PeftModel.from_pretrained(base, run_dir)` works on it directly):

    adapter_config.json, adapter_model.safetensors, tokenizer files   final adapter
    recipe.yaml        the resolved recipe (every key, defaults included)
    run.json           where the base weights and relative paths came from, data counts
    metrics.jsonl      one JSON object per logged step, eval records prefixed eval/
    summary.json       final train and eval metrics, time
    checkpoints/step-NNNNNNN/   adapter + optimizer/scheduler/RNG state, written atomically
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from qdpo import __version__
from qdpo.checkpoint import atomic_dir, list_checkpoints
from qdpo.errors import RunDirError
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
    "output.keep_last", "output.tensorboard", "output.dir",
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
    for k in changed:
        ui.info(f"resume: {k} {a.get(k)} -> {b.get(k)}")
    if LENGTH_KEYS & set(changed):
        ui.info("resume: the run's length changed, so the learning-rate schedule now spans the "
                "new number of steps (the steps already taken are kept as they were)")


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    # -- what is there ---------------------------------------------------------------
    def is_run(self) -> bool:
        """A directory qdpo train wrote (run.json is written by qdpo only)."""
        return (self.path / "run.json").exists()

    def info(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / "run.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def recipe(self) -> Recipe:
        try:
            raw = yaml.safe_load((self.path / "recipe.yaml").read_text())
        except (OSError, yaml.YAMLError) as e:
            raise RunDirError(f"'{self.path}' has no readable recipe.yaml ({e}); is it a qdpo "
                              "run directory?") from None
        return recipe_from_dict(raw, base_dir=self.info().get("recipe_dir", ""))

    # -- starting and resuming ---------------------------------------------------------
    def prepare_for_training(self, recipe: Recipe, resume: str | None,
                             overwrite: bool) -> Path | None:
        """Create or check the directory; return the checkpoint to resume from, if any."""
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
                return ckpt
            if self.is_run() and resume != "auto":
                raise RunDirError(f"No checkpoint to resume at '{resume}'.")
            if self.is_run():
                raise RunDirError(f"'{self.path}' holds a run without any checkpoint to resume "
                                  "from; use --overwrite to start it again.")
            if not (self.path.exists() and any(self.path.iterdir())):
                from qdpo import console as ui

                ui.info(f"resume: nothing to resume in {self.path} (no run there yet); "
                        "starting a new run")
        if self.path.exists() and any(self.path.iterdir()):
            if not overwrite:
                what = "a qdpo run" if self.is_run() else "other files"
                raise RunDirError(
                    f"Output directory '{self.path}' already holds {what}. Use --overwrite to "
                    "replace it, --resume to continue it, or set output.dir to a new path.")
            if not self.is_run():
                raise RunDirError(f"Refusing to --overwrite '{self.path}': it is not a qdpo run "
                                  "directory. Choose another output.dir.")
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

    def _refuse_finished(self, recipe: Recipe) -> None:
        """A finished run continues only when asked for more steps (max_steps or epochs)."""
        try:
            summary = json.loads((self.path / "summary.json").read_text())
        except (OSError, json.JSONDecodeError):
            return  # interrupted or killed before the end: nothing finished
        if summary.get("interrupted") or LENGTH_KEYS & set(recipe_changes(self.recipe(),
                                                                          recipe)):
            return
        steps = summary.get("steps", 0)
        raise RunDirError(
            f"'{self.path}' is a finished run ({steps} steps): there is nothing to resume. To "
            f"train it further, resume with more steps (e.g. train.max_steps={2 * steps} or "
            "more train.epochs); to start again, use --overwrite.")

    def _resume_point(self, resume: str) -> Path | None:
        if resume == "auto":
            ckpts = list_checkpoints(self.path)
            return ckpts[-1] if ckpts else None
        p = Path(resume)
        if p.name.startswith("step-") and p.is_dir():
            return p
        ckpts = list_checkpoints(p)
        if not ckpts:
            raise RunDirError(f"No complete checkpoint found at '{resume}'.")
        return ckpts[-1]

    # -- writing ---------------------------------------------------------------------------
    def write_run_info(self, recipe: Recipe, minfo: Any, data: Any, steps: int) -> None:
        header = (f"# resolved recipe of this run (qdpo {__version__}); relative paths are "
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

    def truncate_metrics(self, step: int) -> None:
        """Drop records after `step`: a resumed run logs those steps again."""
        f = self.path / "metrics.jsonl"
        if not f.exists():
            return
        keep = []
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:  # a line cut by the kill
                continue
        write_text_atomically(f, "".join(x + "\n" for x in keep))

    def save_final(self, save_adapter: Callable[[Path], None]) -> None:
        """The final adapter: written whole under a temporary name, then its files moved in,
        adapter_config.json last (its presence is what marks the run as finished)."""
        tmp = self.path / ".final-adapter"
        atomic_dir(tmp, save_adapter)
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == "adapter_config.json"):
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
    """An adapter and everything needed to rebuild its model: base weights and recipe."""

    def __init__(self, adapter_dir: Path, recipe: Recipe, base_path: str, run: RunDir | None):
        self.adapter_dir = adapter_dir
        self.recipe = recipe
        self.base_path = base_path
        self.run = run

    @property
    def name(self) -> str:
        return self.adapter_dir.name


def open_trained(path: str | Path) -> TrainedSource:
    """Resolve a run dir, a checkpoint dir inside one, or a plain peft adapter directory."""
    p = Path(path)
    if not p.exists():
        raise RunDirError(f"'{path}' does not exist. Pass a qdpo run directory (what `qdpo "
                          "train` wrote) or a peft adapter directory.")
    if not (p / "adapter_config.json").exists():
        if RunDir(p).is_run():
            ckpts = list_checkpoints(p)
            hint = f"; its last checkpoint is {ckpts[-1]}" if ckpts else ""
            raise RunDirError(f"'{path}' is a qdpo run without a final adapter (interrupted "
                              f"or still running{hint}). Resume it, or pass a checkpoint.")
        raise RunDirError(f"'{path}' is neither a qdpo run directory nor a peft adapter "
                          "directory (no adapter_config.json).")
    run_root = p if RunDir(p).is_run() else (
        p.parent.parent if p.parent.name == "checkpoints" and RunDir(p.parent.parent).is_run()
        else None)
    try:
        adapter_cfg = json.loads((p / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
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
