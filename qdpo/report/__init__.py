"""`qdpo report`: one self-contained HTML page about one or more runs.

The page holds the training and eval curves (several runs overlaid; a sweep directory counts as
its runs), the distribution of held-out reward margins at the final eval, the sample prompts
with base and tuned answers at each eval, and each run's recipe and summary. It is a single
file that needs no network and no script: charts are inline SVG drawn here (svg.py says why
not a plotting library), so it can be mailed, attached to an issue or opened years later.

Rooms: runs.py reads run and sweep directories, svg.py draws, page.py lays out and escapes.
"""

from __future__ import annotations

from pathlib import Path

from qdpo.errors import QdpoError

REPORT_FILE = "report.html"


def write_report(runs: list[Path], out: Path, overwrite: bool = False) -> Path:
    """Write the report on `runs` (run or sweep directories) to `out`, atomically (a reader
    never sees half a page); returns `out`. Raises RunDirError for a path that is not a run
    or sweep, or a run with no metrics yet. An existing file is replaced only when it is a
    page qdpo wrote, or with `overwrite`."""
    from qdpo.files import write_text_atomically
    from qdpo.report.page import page
    from qdpo.report.runs import collect

    out = Path(out)
    if out.is_dir():
        raise QdpoError(f"'{out}' is a directory; give the report a file name, e.g. "
                        f"{out / REPORT_FILE}.")
    if out.exists() and not overwrite and not _written_by_qdpo(out):
        raise QdpoError(f"'{out}' already exists and is not a qdpo report; pass --overwrite "
                        "to replace it, or choose another --out.")
    found, sweeps = collect([Path(p) for p in runs])
    write_text_atomically(out, page(found, sweeps))
    return out


def _written_by_qdpo(path: Path) -> bool:
    from qdpo.report.page import GENERATOR

    try:
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return f'<meta name="generator" content="{GENERATOR}">'.encode() in head


def write_run_report(run_dir: Path) -> Path:
    """The report of one run, written into it as report.html (the end of `qdpo train`)."""
    return write_report([Path(run_dir)], Path(run_dir) / REPORT_FILE)


__all__ = ["REPORT_FILE", "write_report", "write_run_report"]
