"""Reading rows: local .jsonl/.json/.parquet/.csv files (a file, a glob or a directory) read
directly, anything else loaded from the Hugging Face hub with `datasets`.

Paths arrive as the user wrote them; a `resolve` callable (like `Recipe.resolve_path`) turns a
relative path into the one to open, so this module never needs the recipe.

A directory is read the way `datasets` reads a local folder, so that a source's `split` picks
the same files there and on the hub: shards named `data/{split}-00000-of-00001.parquet`, folders
and file names that start with the split (or, for train / validation / test, one of the
keywords `datasets` knows for it). A directory whose names carry no split is all `train`.
"""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from qdpo.data.pairs import BadLine
from qdpo.errors import DataError
from qdpo.files import short_error

if TYPE_CHECKING:
    from qdpo.recipe import DataSource

Resolve = Callable[[str], str]
EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


# As datasets.data_files has them: SPLIT_KEYWORDS, NON_WORDS_CHARS, SPLIT_PATTERN_SHARDED.
SPLIT_KEYWORDS = {"train": ("train", "training"),
                  "validation": ("validation", "valid", "dev", "val"),
                  "test": ("test", "testing", "eval", "evaluation")}
_SEP = "-._ 0123456789"
_SHARD = re.compile(r"^(?P<split>[\w.-]+?)-\d{5}-of-\d{5}")


def _starts_with(name: str, word: str) -> bool:
    """`name` is `word`, or `word` followed by a separator (train.jsonl, train_prefs-0...)."""
    return name == word or (name.startswith(word) and name[len(word)] in _SEP)


def _keyword_split(name: str) -> str | None:
    """train / validation / test when a folder or file name carries one of its keywords at
    the start or between separators (datasets' KEYWORDS_IN_*_BASE_PATTERNS)."""
    for split, words in SPLIT_KEYWORDS.items():
        for w in words:
            if _starts_with(name, w) or any(
                    _starts_with(name[i + 1:], w) for i, ch in enumerate(name) if ch in _SEP):
                return split
    return None


def _split_label(rel: Path) -> tuple[str, str | None] | None:
    """(the split a file's place names, the train/validation/test it counts as), or None
    when its name and folders carry no split."""
    shard = _SHARD.match(rel.name)
    if shard and len(rel.parts) <= 2 and rel.parts[0] in ("data", rel.name):
        return shard["split"], None
    for part in rel.parts[:-1]:
        if _keyword_split(part):
            return part, _keyword_split(part)
    canon = _keyword_split(rel.name)
    if canon is None:
        return None
    own = re.split(r"[-.]", rel.name, maxsplit=1)[0].rstrip("_ 0123456789")
    return (own if own and _keyword_split(own) else canon), canon


def _in_split(rel: Path, label: tuple[str, str | None] | None, split: str) -> bool:
    """A shard by its own split name only, as datasets does; any other file also by a
    folder or file name that starts with the split, or by the keyword split it counts as."""
    if label is not None and label[1] is None:
        return label[0] == split
    if label is not None and split in label:
        return True
    return any(_starts_with(part, split) for part in rel.parts)


def _split_files(d: Path, split: str) -> list[Path]:
    """The files of one split of directory `d` (see the module's docstring)."""
    found = sorted(f for f in d.rglob("*") if f.suffix in EXTENSIONS and f.is_file()
                   and not any(n.startswith((".", "__")) for n in f.relative_to(d).parts))
    labels = {f: _split_label(f.relative_to(d)) for f in found}
    picked = [f for f in found if _in_split(f.relative_to(d), labels[f], split)]
    names = sorted({lab[0] for lab in labels.values() if lab is not None})
    if not picked and not names:
        if split == "train":  # no split in any name: every file at the top, as always
            return [f for f in found if f.parent == d]
        raise DataError(
            f"Data directory '{d}' has no file for split '{split}': its file names carry no "
            f"split. Name the files after it ({split}.jsonl, {split}-00000-of-00001.parquet or "
            f"a folder {split}/), or point the source at the file and leave split out.")
    if not picked:
        raise DataError(f"Data directory '{d}' has no file for split '{split}'. Splits found: "
                        f"{', '.join(names)}. Set the source's split to one of them.")
    mixed = sorted({labels[f][0] if labels[f] else split for f in picked})
    if len(mixed) > 1 and split not in mixed:
        raise DataError(f"Split '{split}' of data directory '{d}' matches the files of several "
                        f"splits: {', '.join(mixed)}. Set the source's split to one of them.")
    return picked


def local_files(path: str, split: str = "train") -> list[Path] | None:
    """The files a local path names, or None when it names no local file (a hub id). A
    directory gives the files of `split`; a file or a glob is taken as it is."""
    p = Path(path)
    if any(ch in path for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(path))
        if not files:
            raise DataError(f"Data path '{path}' matches no file.")
        return files
    if p.is_dir():
        files = _split_files(p, split)
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


def _read_json_file(f: Path) -> list[Any]:
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
        except json.JSONDecodeError as e:  # one bad line is one bad row, as in CSV files
            rows.append(BadLine(f"not valid JSON ({e.msg})", i))
    return rows


RAGGED = "more fields than the CSV header (a comma outside quotes?)"
_SKIPPED_LINE = re.compile(r"Skipping line (\d+)")


def _read_csv(f: Path) -> list[dict[str, Any] | BadLine]:
    """A CSV file's rows, text kept as text even where it looks like a number. A line with
    more fields than the header is one bad row, counted where it stood, not the end of the
    file: pandas skips it and warns with its line number (counted in records, as pandas'
    own errors count them: the same as the file's lines unless a quoted field spans lines)."""
    import warnings

    import pandas as pd

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pd.errors.ParserWarning)
        rows: list[Any] = pd.read_csv(f, dtype=str, keep_default_na=False,
                                      on_bad_lines="warn").to_dict("records")
    lines = sorted(int(n) for w in caught if issubclass(w.category, pd.errors.ParserWarning)
                   for n in _SKIPPED_LINE.findall(str(w.message)))
    for n in lines:  # record n is data row n - 1, at index n - 2 once the earlier ones are in
        rows.insert(min(max(n - 2, 0), len(rows)), BadLine(RAGGED, n))
    return rows


def _read_table(f: Path, kind: str) -> list[Any]:
    if kind == "csv":
        return _read_csv(f)
    import datasets

    return datasets.load_dataset(kind, data_files=str(f), split="train").to_list()


def _read_local_file(f: Path) -> list[Any]:
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


def read_rows(source: DataSource, resolve: Resolve | None = None) -> list[Any]:
    """All rows of one source as plain dicts (local files read directly, hub via datasets),
    with a BadLine where a line could not be split into a row."""
    path = resolve(source.path) if resolve else source.path
    files = local_files(path, source.split)
    if files is None:
        return _read_hub(source, path)
    rows: list[Any] = []
    for f in files:
        rows.extend(_read_local_file(f))
    return rows
