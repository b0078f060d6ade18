"""Shared helpers for tests: tiny models and recipes, all offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "recipes" / "quickstart"
QUICKSTART_RECIPE = REPO / "recipes" / "quickstart.yaml"


def quickstart_recipe(tmp_path: Path, *overrides: str) -> Any:
    """The quickstart recipe, writing into tmp_path, with overrides applied."""
    from qdpo.recipe import load_recipe

    return load_recipe(QUICKSTART_RECIPE, [f"output.dir={tmp_path / 'run'}", *overrides])


def qdpo(*args: Any, stdin: str | None = None, subprocess: bool = False, timeout: int = 600):
    """Run the `qdpo` command; returns an object with returncode, stdout, stderr.

    In-process by default (the command's own `main`, with argv, stdin, stdout and stderr
    swapped), which saves the ~6 s of imports a fresh interpreter pays per call;
    `subprocess=True` runs `python -m qdpo` for real.
    """
    import contextlib
    import io
    import os
    import subprocess as sp
    import sys
    import traceback
    from types import SimpleNamespace

    argv = [str(a) for a in args]
    if subprocess:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        return sp.run([sys.executable, "-m", "qdpo", *argv], capture_output=True, text=True,
                      cwd=REPO, env=env, timeout=timeout, input=stdin, check=False)
    from qdpo.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv, sys.stdin
    sys.argv = ["qdpo", *argv]
    sys.stdin = io.StringIO(stdin or "")
    rc = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # what the interpreter would print, and its exit status
                traceback.print_exc()
                rc = 1
    finally:
        sys.argv, sys.stdin = saved
    return SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


def write_jsonl(path: Path, rows: Any) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def asst(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}
