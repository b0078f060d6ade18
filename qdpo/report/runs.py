"""What a report reads: run directories (a sweep directory counts as its runs) and their files.

Everything here is read as untrusted data: a run directory may come from someone else, be cut
by a kill mid-write, or be hand-edited. Damaged lines are skipped (as `metric_lines` does for
resuming), odd types become text, and nothing is interpreted as markup or code.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qdpo.errors import RunDirError
from qdpo.rundir import RunDir, metric_lines
from qdpo.samples import SAMPLES_FILE


def usable(v: Any) -> bool:
    """A number a chart can place: finite, and far enough from the float limits that the
    span of an axis cannot overflow (a damaged or hand-edited log may hold anything)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e300


@dataclass
class ReportRun:
    path: Path
    label: str
    records: list[dict[str, Any]]
    info: dict[str, Any]
    summary: dict[str, Any] | None
    recipe_text: str
    samples: list[dict[str, Any]]
    margins: tuple[int, list[float]] | None

    columns: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Every numeric key's (step, value) points, in one pass over the records (a long
        run has hundreds of thousands, and each chart asks for two keys of every run)."""
        for r in self.records:
            step = float(r.get("step", 0))
            for k, v in r.items():
                if usable(v):
                    self.columns.setdefault(k, []).append((step, float(v)))

    def series(self, key: str) -> list[tuple[float, float]]:
        """(step, value) of every record that logged `key` as a finite number."""
        return self.columns.get(key, [])

    def keys(self) -> list[str]:
        """Every key logged as a finite number, in first-seen order."""
        return list(self.columns)

    def recipe(self) -> dict[str, Any]:
        try:
            raw = yaml.safe_load(self.recipe_text)
        except yaml.YAMLError:
            return {}
        return raw if isinstance(raw, dict) else {}

    def status(self) -> str:
        if self.summary is None:
            return "running or stopped"
        return "interrupted" if self.summary.get("interrupted") else "finished"


@dataclass
class SweepInfo:
    """A sweep directory named on the command line: its record, for the ranking table."""

    path: Path
    record: dict[str, Any]
    skipped: list[str] = field(default_factory=list)  # runs with nothing to chart, and why


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise RunDirError(f"Cannot read '{path}': {e.strerror or e}.") from None
    lines, damaged = metric_lines(data, sys.maxsize)
    if damaged:  # a log, not the source of truth: chart the rest, but say so
        from qdpo import console as ui

        ui.warn(f"{path}: {ui.plural(damaged, 'damaged line')} skipped (not UTF-8, not a JSON "
                "object, or a step that is not an integer)")
    return [json.loads(x) for x in lines]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def load_run(path: Path) -> ReportRun:
    run = RunDir(path)
    try:
        recipe_text = (path / "recipe.yaml").read_text(encoding="utf-8", errors="replace")
    except OSError:
        recipe_text = ""
    return ReportRun(path=path, label=path.name, records=_read_jsonl(path / "metrics.jsonl"),
                     info=run.info(), summary=_read_json(path / "summary.json"),
                     recipe_text=recipe_text, samples=_read_jsonl(path / SAMPLES_FILE),
                     margins=run.eval_margins())


def _sweep_runs(path: Path, record: dict[str, Any]) -> tuple[list[ReportRun], SweepInfo]:
    """The sweep's runs that have logged something, in grid order. Run directories are looked
    up by name under the sweep directory, so a moved or copied sweep still reports."""
    sweep = SweepInfo(path, record)
    runs = []
    for entry in record.get("runs") or []:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            continue
        sub = path / name
        run = load_run(sub) if RunDir(sub).is_run() else None
        if run is None or not run.records:
            why = entry.get("error") or ("no metrics yet" if run else "not started")
            sweep.skipped.append(f"{name}: {why}")
            continue
        runs.append(run)
    if not runs:
        raise RunDirError(f"Sweep '{path}' has no run with metrics yet (none has logged a "
                          "training step); report it once one has.")
    return runs, sweep


def collect(paths: list[Path]) -> tuple[list[ReportRun], list[SweepInfo]]:
    """The runs behind `paths` (each a run directory or a sweep directory), each once."""
    from qdpo.rundir import read_sweep_record

    if not paths:
        raise RunDirError("Name at least one run directory or sweep directory to report on.")
    runs: list[ReportRun] = []
    sweeps: list[SweepInfo] = []
    for p in map(Path, paths):
        if not p.is_dir():
            what = "is not a directory" if p.exists() else "does not exist"
            raise RunDirError(f"'{p}' {what}: pass a qdpo run directory (what `qdpo train` "
                              "wrote) or a sweep directory (what `qdpo sweep` wrote).")
        record = read_sweep_record(p)
        if record is not None:
            found, sweep = _sweep_runs(p, record)
            runs.extend(found)
            sweeps.append(sweep)
        elif RunDir(p).is_run():
            run = load_run(p)
            if not run.records:
                raise RunDirError(f"'{p}' is a qdpo run without metrics yet (metrics.jsonl is "
                                  "missing or empty: no step was logged); report it once it "
                                  "has trained a step.")
            runs.append(run)
        else:
            raise RunDirError(f"'{p}' is neither a qdpo run directory (no run.json written by "
                              "`qdpo train`) nor a sweep directory (no sweep.json).")
    unique, seen = [], set()
    for r in runs:  # a run named twice, or also through its sweep, is charted once
        if r.path.resolve() not in seen:
            seen.add(r.path.resolve())
            unique.append(r)
    label_runs(unique)
    return unique, sweeps


def label_runs(runs: list[ReportRun]) -> None:
    """Names for the legend: the directory name, with as many parent folders as it takes to
    tell two runs apart (two sweeps both have a `beta=0.1`)."""
    parts = [r.path.resolve().parts for r in runs]
    depth = 1
    while depth < max((len(p) for p in parts), default=1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            break
        depth += 1
    for r, p in zip(runs, parts):
        r.label = "/".join(p[-depth:])
