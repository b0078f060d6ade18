"""`qdpo sweep`: train a grid of recipe overrides one run after another, then rank the runs.

Every grid point is a normal run directory under the sweep directory, so everything that reads
a run (eval, merge, chat, --resume) works on it. The runs share what the caches already share:
tokenized pairs (keyed by the data settings) and reference log-probs (keyed by the base
weights, the starting adapter and the tokenized pairs, never by beta or the learning rate), so a
sweep of loss or optimizer keys pays for tokenization and the reference pass once.

`sweep.json` in the sweep directory is the sweep's record: the grid, each run's directory,
status and final metrics, and the ranking. It is rewritten atomically after every run, so a
sweep stopped at any moment can be resumed (`--resume`) without training a finished run again.
"""

from __future__ import annotations

import gc
import itertools
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qdpo import __version__
from qdpo import console as ui
from qdpo.errors import QdpoError, RecipeError, RunDirError, listed
from qdpo.files import short_error, write_text_atomically
from qdpo.recipe import Recipe, load_recipe
from qdpo.rundir import SWEEP_FILE, read_sweep_record

# What the reference cache key (reference.cache_key) depends on: the base weights and how they
# are loaded (model.*), the starting adapter, and the tokenized pairs, which follow from the
# data and eval settings and train.seed (shuffling, sampling, the held-out split, and the
# weights of a random_init model). Sweeping any of these computes a reference per value.
REFERENCE_SECTIONS = ("model.", "data.", "eval.")
REFERENCE_KEYS = {"lora.init_adapter", "train.seed"}
# eval keys that change when or how evaluation runs, not which pairs it holds
EVAL_SCHEDULE_KEYS = {"eval.every_steps", "eval.at_start", "eval.micro_batch_pairs",
                      "eval.sample_prompts", "eval.sample_max_new_tokens"}
# Keys that change which training pairs the run uses: the cache is shared, but a run may have
# to compute the log-probs of pairs an earlier run did not use.
PAIR_SET_KEYS = {"train.max_steps", "train.epochs", "train.pairs_per_step"}
RANK_EVAL = ("held-out rewards/accuracies, then the log-ratio margin (the reward margin over "
             "beta, comparable across betas), then lower eval loss")
RANK_TRAIN = "final train loss (no eval data)"


# ---------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------

def split_values(text: str) -> list[str]:
    """The comma-separated values of an override. A comma does not split inside [...], {...}
    or quotes (`loss.type=[sigmoid,sft],sigmoid` is two values), nor when written `\\,`."""
    values, cur, depth, quote, i = [], [], 0, "", 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and text[i + 1:i + 2] == ",":
            cur.append(",")
            i += 2
            continue
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            values.append("".join(cur))
            cur = []
            i += 1
            continue
        cur.append(ch)
        i += 1
    values.append("".join(cur))
    return values


@dataclass
class Grid:
    """Swept keys with their values (in the order given) and the overrides every run gets."""

    keys: list[str] = field(default_factory=list)
    values: list[list[str]] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)

    def points(self) -> list[dict[str, str]]:
        """The product of the values, the last key varying fastest."""
        return [dict(zip(self.keys, combo)) for combo in itertools.product(*self.values)]

    def overrides(self, point: dict[str, str]) -> list[str]:
        return self.fixed + [f"{k}={v}" for k, v in point.items()]

    def to_dict(self) -> dict[str, Any]:
        return {"swept": dict(zip(self.keys, self.values)), "fixed": self.fixed}


def parse_grid(args: list[str]) -> Grid:
    """`key=a,b,c` arguments are swept, plain `key=value` ones apply to every run."""
    grid, seen = Grid(), set()
    for arg in args:
        key, eq, raw = arg.partition("=")
        key = key.strip()
        if not eq or not key:
            raise RecipeError(f"Sweep argument '{arg}' is not of the form key.sub=value or "
                              "key.sub=v1,v2,... (e.g. loss.beta=0.05,0.1).")
        if key in seen:
            raise RecipeError(f"Sweep key '{key}' is given twice: give its values once, "
                              "comma-separated.")
        if key == "output.dir":
            raise RecipeError("A sweep sets output.dir of each run itself: use --out DIR for "
                              "the sweep directory.")
        seen.add(key)
        values = split_values(raw)
        if len(values) == 1:
            grid.fixed.append(f"{key}={values[0]}")
            continue
        if any(not v.strip() for v in values):
            raise RecipeError(f"Sweep key '{key}' has an empty value in '{raw}' (a stray comma?)")
        if len(set(values)) < len(values):
            raise RecipeError(f"Sweep key '{key}' lists a value twice in '{raw}'.")
        grid.keys.append(key)
        grid.values.append(values)
    return grid


def _short(value: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._+-]+", "-", value).strip("-.") or "x"
    return safe[:40]


def run_names(grid: Grid) -> list[str]:
    """Run directory names: `leaf=value` per swept key, joined by `_` (`beta=0.05_
    learning_rate=5e-6`), the value as typed with anything but letters, digits and `._+-`
    replaced by `-`. The full key is used where two swept keys share their last part, and
    `-<n>` (the grid index) is added where names would still collide."""
    leaves = [k.rsplit(".", 1)[-1] for k in grid.keys]
    labels = [k if leaves.count(leaf) > 1 else leaf for k, leaf in zip(grid.keys, leaves)]
    names = ["_".join(f"{lab}={_short(p[k])}" for lab, k in zip(labels, grid.keys)) or "run"
             for p in grid.points()]
    return [f"{n}-{i + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def grid_recipes(recipe_path: str | Path, grid: Grid, sweep_dir: Path) -> list[Recipe]:
    """Every grid point's recipe, validated before anything trains."""
    recipes = []
    for point, name in zip(grid.points(), run_names(grid)):
        where = ", ".join(f"{k}={v}" for k, v in point.items())
        try:
            recipes.append(load_recipe(recipe_path, grid.overrides(point)
                                       + [f"output.dir={sweep_dir / name}"]))
        except RecipeError as e:
            raise RecipeError(f"Sweep point {where}: {e}") from None
    return recipes


def reference_sharing(grid: Grid, recipes: list[Recipe]) -> tuple[bool | None, str]:
    """Whether the runs can share one precomputed reference, and a sentence saying why.
    None: no run precomputes a reference (reference-free losses, or train.reference online)."""
    if not any(r.needs_reference and r.train.reference != "online" for r in recipes):
        return None, "reference: none precomputed (reference-free loss or train.reference online)"
    changing = [k for k in grid.keys if (k.startswith(REFERENCE_SECTIONS) or k in REFERENCE_KEYS)
                and k not in EVAL_SCHEDULE_KEYS]
    if changing:
        return False, (f"reference: not shared: {listed(changing)} change the reference "
                       "log-probs, so each of their values computes its own (then cached)")
    msg = ("reference: shared: no swept key changes the reference log-probs; the first run "
           "computes them, later runs reuse them from the cache")
    partial = [k for k in grid.keys if k in PAIR_SET_KEYS]
    if partial:
        msg += (f" ({listed(partial)} change which pairs a run uses: those the first did not "
                "use are computed then)")
    return True, msg


# ---------------------------------------------------------------------------------------
# The record: sweep.json
# ---------------------------------------------------------------------------------------

@dataclass
class SweepRun:
    name: str
    dir: str
    overrides: dict[str, str]
    status: str = "pending"  # pending, done, failed
    error: str | None = None
    steps: int = 0
    interrupted: bool = False
    reference_reused: bool | None = None
    eval: dict[str, float] = field(default_factory=dict)
    train: dict[str, float] = field(default_factory=dict)


@dataclass
class SweepResult:
    sweep_dir: Path
    runs: list[SweepRun]
    ranked: list[SweepRun]  # done runs, best first
    ranked_by: str
    best: SweepRun | None
    reference_shared: bool | None
    interrupted: bool = False


TRAIN_KEPT = ("loss", "rewards/accuracies", "rewards/margins")


def _write_record(sweep_dir: Path, recipe_path: str | Path, grid: Grid, runs: list[SweepRun],
                  shared: bool | None) -> dict[str, Any]:
    ranked, ranked_by = rank(runs)
    record = {"qdpo_version": __version__, "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "recipe": str(Path(recipe_path).resolve()), "grid": grid.to_dict(),
              "reference_shared": shared, "ranked_by": ranked_by,
              "ranking": [r.name for r in ranked],
              "best": ranked[0].name if ranked else None,
              "runs": [asdict(r) for r in runs]}
    write_text_atomically(sweep_dir / SWEEP_FILE, json.dumps(record, indent=2))
    return record


def _finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary of a run that finished (final adapter written, not interrupted), else None."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("interrupted"):
        return None
    return summary if (run_dir / "adapter_config.json").exists() else None


def _mark_done(run: SweepRun, summary: dict[str, Any]) -> None:
    train = summary.get("train") or {}
    run.status, run.error, run.interrupted = "done", None, False
    run.steps = summary.get("steps", 0)
    run.reference_reused = summary.get("reference_reused")
    run.eval = dict(summary.get("eval") or {})
    run.train = {k: train[k] for k in TRAIN_KEPT if k in train}


# ---------------------------------------------------------------------------------------
# The sweep directory
# ---------------------------------------------------------------------------------------

def _prepare_dir(sweep_dir: Path, grid: Grid, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two sweeps in one directory; --overwrite removes only what qdpo wrote."""
    if not sweep_dir.exists() or not any(sweep_dir.iterdir()):
        if resume:
            ui.info(f"sweep: nothing to resume in {sweep_dir}; starting the sweep")
        return
    record = read_sweep_record(sweep_dir)
    if record is None:
        raise RunDirError(f"Sweep directory '{sweep_dir}' already holds files but no "
                          f"{SWEEP_FILE}: choose another --out.")
    if resume:
        if record.get("grid") != grid.to_dict():
            raise RunDirError(f"Cannot resume the sweep in '{sweep_dir}': it was started with "
                              f"another grid ({json.dumps(record.get('grid'))}). Pass the same "
                              "arguments, or start again with --overwrite.")
        return
    if not overwrite:
        raise RunDirError(f"Sweep directory '{sweep_dir}' already holds a sweep. Pass --resume "
                          "to finish it, --overwrite to start it again, or --out DIR for a new "
                          "one.")
    _remove_sweep(sweep_dir, record)


def _remove_sweep(sweep_dir: Path, record: dict[str, Any]) -> None:
    from qdpo.rundir import RunDir

    names = {r.get("name") for r in record["runs"] if isinstance(r, dict)}
    strays = []
    for e in sweep_dir.iterdir():
        if e.name == SWEEP_FILE or e.name.startswith(f".{SWEEP_FILE}."):
            continue
        if not (e.is_dir() and not e.is_symlink() and e.name in names
                and not RunDir(e).unexpected_entries()):
            strays.append(e.name)
    if strays:
        raise RunDirError(f"Refusing to --overwrite '{sweep_dir}': besides the sweep's runs it "
                          f"holds {listed(sorted(strays))}, which qdpo did not write. Move them "
                          "out, or choose another --out.")
    shutil.rmtree(sweep_dir)


def default_sweep_dir(recipe_path: str | Path, fixed: list[str]) -> Path:
    """`<output.dir>-sweep`: runs/<recipe name>-sweep unless the recipe names its output.dir."""
    return Path(f"{load_recipe(recipe_path, fixed).output.dir.rstrip('/')}-sweep").expanduser()


# ---------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------

def _release_memory() -> None:
    """Free the finished run's model before the next one loads (a failed run's frames too)."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def _train_one(recipe: Recipe, run: SweepRun) -> bool:
    """Train (or continue) one grid point and record the outcome; False when interrupted."""
    from qdpo import train as train_module
    from qdpo.checkpoint import list_checkpoints
    from qdpo.rundir import RunDir

    path = Path(run.dir)
    resume = "auto" if list_checkpoints(path) else None
    # a run of this sweep that stopped before its first checkpoint starts again
    overwrite = resume is None and RunDir(path).is_run()
    try:
        result = train_module.train(recipe, resume=resume, overwrite=overwrite)
    except QdpoError as e:
        run.status, run.error = "failed", str(e)
        ui.warn(f"sweep: {run.name} failed: {e}")
        return True
    except KeyboardInterrupt:
        run.status, run.interrupted = "pending", True
        raise
    except Exception as e:  # a bug: recorded, then shown with its traceback
        run.status, run.error = "failed", short_error(e)
        raise
    finally:
        RunDir(path).unlock()
        _release_memory()
    if result.interrupted:
        run.status, run.interrupted, run.steps = "pending", True, result.steps
        return False
    summary = _finished_summary(path) or {
        "steps": result.steps, "eval": result.final_eval, "train": result.last_train,
        "reference_reused": result.reference_reused}
    _mark_done(run, summary)
    return True


def _recorded_grid(sweep_dir: Path, grid: Grid) -> Grid:
    g = (read_sweep_record(sweep_dir) or {}).get("grid") or {}
    swept = g.get("swept") or {}
    if not isinstance(swept, dict):
        return grid
    return Grid(list(swept), [list(v) for v in swept.values()], list(g.get("fixed") or []))


def _load_runs(grid: Grid, recipes: list[Recipe], record: dict[str, Any] | None) -> list[SweepRun]:
    """The runs of the grid: done where the run directory holds a finished run (whatever
    sweep.json says: a kill after training and before the record was written loses nothing),
    failed where the record says so, else pending."""
    old = {r.get("name"): r for r in (record or {}).get("runs", []) if isinstance(r, dict)}
    runs = []
    for point, name, recipe in zip(grid.points(), run_names(grid), recipes):
        run = SweepRun(name, recipe.output.dir, point)
        summary = _finished_summary(Path(run.dir))
        if summary is not None:
            _mark_done(run, summary)
        elif old.get(name, {}).get("status") == "failed":
            run.status, run.error = "failed", old[name].get("error")
        runs.append(run)
    return runs


def run_sweep(recipe_path: str | Path, grid_args: list[str], out: str | Path | None = None,
              resume: bool = False, overwrite: bool = False) -> SweepResult:
    """Train every point of the grid (`key=v1,v2` arguments, their product in the order given;
    plain `key=value` applies to all), one after another, then rank the runs.

    Every grid point's recipe is validated first. A run that fails with a QdpoError is recorded
    as failed and the sweep goes on; Ctrl-C stops it after the current run's checkpoint."""
    grid = parse_grid(list(grid_args))
    if resume and not grid_args:  # `qdpo sweep RECIPE --resume`: the grid it was started with
        grid = _recorded_grid(Path(out).expanduser() if out else
                              default_sweep_dir(recipe_path, []), grid)
    if not grid.keys:
        raise RecipeError("Nothing to sweep: give at least one key with comma-separated values, "
                          "e.g. loss.beta=0.05,0.1,0.3.")
    sweep_dir = Path(out).expanduser() if out else default_sweep_dir(recipe_path, grid.fixed)
    recipes = grid_recipes(recipe_path, grid, sweep_dir)
    _prepare_dir(sweep_dir, grid, resume, overwrite)
    shared, sharing = reference_sharing(grid, recipes)
    runs = _load_runs(grid, recipes, read_sweep_record(sweep_dir) if resume else None)
    todo = [(r, run) for r, run in zip(recipes, runs) if run.status != "done"]
    ui.info(f"sweep: {len(runs)} runs ({' x '.join(str(len(v)) for v in grid.values)} over "
            f"{', '.join(grid.keys)}) in {sweep_dir}"
            + (f"; {len(runs) - len(todo)} already done" if len(todo) < len(runs) else ""))
    ui.info(sharing)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    _write_record(sweep_dir, recipe_path, grid, runs, shared)
    interrupted = False
    for i, (recipe, run) in enumerate(todo):
        ui.info(f"sweep: run {i + 1}/{len(todo)}: {run.name}")
        try:
            interrupted = not _train_one(recipe, run)
        finally:  # the record is current whatever happens, Ctrl-C and bugs included
            _write_record(sweep_dir, recipe_path, grid, runs, shared)
        if interrupted:
            ui.warn(f"sweep: stopped after {run.name}'s checkpoint; finish it with --resume")
            break
    return _finish(sweep_dir, grid, runs, shared, interrupted)


# ---------------------------------------------------------------------------------------
# Ranking and the table
# ---------------------------------------------------------------------------------------

def rank(runs: list[SweepRun]) -> tuple[list[SweepRun], str]:
    """Finished runs, best first: by held-out accuracy, then margin, then lower eval loss when
    every finished run has eval metrics; otherwise all by final train loss."""
    done = [r for r in runs if r.status == "done"]
    if not done:
        return [], "nothing yet (no finished run)"

    def num(d: dict[str, float], k: str, default: float) -> float:
        v = d.get(k)
        return default if v is None or v != v else float(v)

    def log_ratio_margin(ev: dict[str, float]) -> float:
        """How much more the policy prefers chosen than the reference does, in log-probs: the
        reward margin without beta, which scales it (a beta sweep would rank by beta). The
        reward margin where a loss has no reference."""
        keys = ("logps/chosen", "logps/ref_chosen", "logps/rejected", "logps/ref_rejected")
        if not all(k in ev for k in keys):
            return num(ev, "rewards/margins", -1e30)
        c, rc, r, rr = (num(ev, k, float("nan")) for k in keys)
        m = (c - rc) - (r - rr)
        return m if m == m else -1e30

    if all("rewards/accuracies" in r.eval for r in done):
        return sorted(done, key=lambda r: (-num(r.eval, "rewards/accuracies", -1e30),
                                           -log_ratio_margin(r.eval),
                                           num(r.eval, "loss", 1e30))), RANK_EVAL
    return sorted(done, key=lambda r: num(r.train, "loss", 1e30)), RANK_TRAIN


def results_table(grid: Grid, runs: list[SweepRun], ranked: list[SweepRun], ranked_by: str):
    from rich.table import Table

    t = Table(title=f"qdpo sweep: ranked by {ranked_by}", title_justify="left")
    t.add_column("#", justify="right")
    t.add_column("run")
    for k in grid.keys:
        t.add_column(k, justify="right")
    for col in ("eval acc", "eval margin", "eval loss", "train loss", "steps", "ref reused"):
        t.add_column(col, justify="right")
    order = ranked + [r for r in runs if r not in ranked]
    for r in order:
        place = str(ranked.index(r) + 1) if r in ranked else r.status
        cells = [ui.fmt(d[k]) if k in d else "-" for d, k in
                 ((r.eval, "rewards/accuracies"), (r.eval, "rewards/margins"), (r.eval, "loss"),
                  (r.train, "loss"))]
        reused = {True: "yes", False: "no", None: "-"}[r.reference_reused]
        t.add_row(place, r.name, *(r.overrides[k] for k in grid.keys), *cells,
                  str(r.steps) if r.status == "done" else "-", reused,
                  style="bold" if ranked and r is ranked[0] else None)
    return t


def _finish(sweep_dir: Path, grid: Grid, runs: list[SweepRun], shared: bool | None,
            interrupted: bool) -> SweepResult:
    ranked, ranked_by = rank(runs)
    ui.show(results_table(grid, runs, ranked, ranked_by))
    for r in runs:
        if r.status == "failed":
            ui.warn(f"sweep: {r.name} failed: {r.error}")
    if shared:
        reused = [r.name for r in runs if r.reference_reused]
        if reused:
            ui.info(f"reference: reused from the cache by {listed(reused)} (reference_reused "
                    "in their summary.json)")
    best = ranked[0] if ranked else None
    if best is not None:
        ui.info(f"best run: {best.name} ({best.dir}), ranked by {ranked_by}")
    pending = sum(r.status == "pending" for r in runs)
    if pending and not interrupted:
        ui.info(f"sweep: {pending} runs not finished; continue with --resume")
    ui.info(f"sweep record: {sweep_dir / SWEEP_FILE}")
    return SweepResult(sweep_dir, runs, ranked, ranked_by, best, shared, interrupted)
