"""Reading rows: local .jsonl/.json/.parquet/.csv files (a file, a glob or a directory) read
directly, anything else loaded from the Hugging Face hub with `datasets`.

Paths arrive as the user wrote them; a `resolve` callable (like `Recipe.resolve_path`) turns a
relative path into the one to open, so this module never needs the recipe.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from qdpo.errors import DataError
from qdpo.files import short_error

if TYPE_CHECKING:
    from qdpo.recipe import DataSource

Resolve = Callable[[str], str]
EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def local_files(path: str) -> list[Path] | None:
    """The files a local path names, or None when it names no local file (a hub id)."""
    p = Path(path)
    if any(ch in path for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(path))
        if not files:
            raise DataError(f"Data path '{path}' matches no file.")
        return files
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in EXTENSIONS)
        if not files:
            raise DataError(f"Data directory '{path}' holds no .jsonl/.json/.parquet/.csv file.")
        return files
    if p.is_file():
        return [p]
    if p.suffix in EXTENSIONS or path.startswith((".", "/", "~")):
        raise DataError(f"Data file '{path}' does not exist. Check data.train / eval.data "
                        "(relative paths are looked up next to the recipe, then in the current "
                        "directory).")
    return None


def _read_json_document(f: Path, text: str) -> list[dict[str, Any]] | None:
    """A .json file holding one document: a list of rows, {"data": [...]}, or one row. None
    when the text is JSON lines after all."""
    stripped = text.lstrip()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if not stripped.startswith("{"):
            raise DataError(f"'{f}' is not valid JSON: {e}.") from None
        return None
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict):
        for v in obj.values():  # {"data": [...]} style
            if isinstance(v, list) and (not v or isinstance(v[0], dict)):
                return v
        return [obj]
    return None


def _read_json_file(f: Path) -> list[dict[str, Any]]:
    text = f.read_text(encoding="utf-8-sig")
    if f.suffix == ".json" and text.lstrip().startswith(("[", "{")):
        rows = _read_json_document(f, text)
        if rows is not None:
            return rows
    rows = []
    # split on newlines only: str.splitlines also breaks at U+2028 etc., which JSON strings
    # may hold raw
    for i, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"'{f}' line {i} is not valid JSON ({e.msg}). Fix or remove that "
                            "line.") from None
    return rows


def _read_table(f: Path, kind: str) -> list[dict[str, Any]]:
    if kind == "csv":  # text stays text, even when it looks like a number
        import pandas as pd

        return pd.read_csv(f, dtype=str, keep_default_na=False).to_dict("records")
    import datasets

    return datasets.load_dataset(kind, data_files=str(f), split="train").to_list()


def _read_local_file(f: Path) -> list[dict[str, Any]]:
    kind = EXTENSIONS.get(f.suffix)
    if kind is None:
        raise DataError(f"Data file '{f}' has an unknown extension; use .jsonl, .json, "
                        ".parquet or .csv.")
    try:
        return _read_json_file(f) if kind == "json" else _read_table(f, kind)
    except DataError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"Data file '{f}' cannot be read: {e}") from None
    except Exception as e:  # arrow / parser errors come in many types
        raise DataError(f"Data file '{f}' cannot be read as {kind}: "
                        f"{type(e).__name__}: {e}") from None


def _read_hub(source: DataSource, path: str) -> list[dict[str, Any]]:
    try:
        import datasets

        ds = datasets.load_dataset(path, source.name, split=source.split,
                                   revision=source.revision)
    except Exception as e:
        raise DataError(
            f"Data source '{source.path}' is neither a local file nor a loadable hub dataset "
            f"(split '{source.split}'{', config ' + source.name if source.name else ''}): "
            f"{short_error(e)}") from None
    return ds.to_list()


def read_rows(source: DataSource, resolve: Resolve | None = None) -> list[dict[str, Any]]:
    """All rows of one source as plain dicts (local files read directly, hub via datasets)."""
    path = resolve(source.path) if resolve else source.path
    files = local_files(path)
    if files is None:
        return _read_hub(source, path)
    rows: list[dict[str, Any]] = []
    for f in files:
        rows.extend(_read_local_file(f))
    return rows
