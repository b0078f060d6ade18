"""Writing files so that a kill at any moment leaves the old version or the whole new one.

Every place that writes something a later command reads (checkpoints, caches, exports, run
metadata) goes through here: write under a temporary name beside the target, flush it to disk,
then rename, which is atomic on one file system. On an error the temporary is removed.
Also `short_error`, the one way an exception is shortened for a message.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Iterator


# Files get the mode the user's umask gives any new file: some writers (safetensors) create
# theirs 0600, which left weights unreadable to the group when every other file was not.
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


def _finish_file(path: Path) -> None:
    os.chmod(path, FILE_MODE)
    fsync_path(path)


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entries to disk (best effort: not every FS allows it)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary(path: Path, kind: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # what an earlier writer of this path left when it was killed (a merge or an export
    # killed half-way leaves gigabytes)
    remove_stale_temporaries(path.parent.glob(f".{glob.escape(path.name)}.*-*"))
    tmp = path.with_name(f".{path.name}.{kind}-{os.getpid()}")
    _remove(tmp)
    return tmp


def remove_stale_temporaries(paths: Iterable[Path]) -> list[Path]:
    """Of `paths`, remove the temporaries (`.NAME.tmp-PID`, `.NAME.old-PID`) whose writing
    process is gone; returns what was removed."""
    removed = []
    for p in paths:
        pid = _temporary_owner(p.name)
        if pid is None or pid == os.getpid() or _alive(pid):
            continue
        _remove(p)
        removed.append(p)
    return removed


def _temporary_owner(name: str) -> int | None:
    m = re.fullmatch(r"\..+\.(?:tmp|old)-(\d+)", name)
    return int(m.group(1)) if m else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def write_atomically(path: Path) -> Iterator[Path]:
    """Yield a temporary file name beside `path`; when the block ends without error the file
    is flushed and replaces `path`; on any error it is removed and `path` is untouched."""
    tmp = _temporary(path, "tmp")
    try:
        yield tmp
        _finish_file(tmp)
        tmp.replace(path)
        fsync_path(path.parent)
    finally:
        _remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: Path, keep_existing: bool = False) -> Iterator[Path]:
    """Like write_atomically for a directory: fill the yielded empty directory; on success it
    replaces `path` (an older file or directory there is removed only after the new one is
    complete); on error it is removed and `path` is untouched.

    `keep_existing`: a directory that another process completed first wins and ours is
    dropped (content that is the same whoever writes it, e.g. seeded random weights; replacing
    it would pull it from under a process that is reading it)."""
    tmp = _temporary(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _finish_file(f)
        fsync_path(tmp)
        if keep_existing:
            try:
                tmp.rename(path)  # fails if another process's directory got there first
            except OSError:
                if not path.is_dir():
                    raise
        elif path.exists() or path.is_symlink():
            old = _temporary(path, "old")
            path.rename(old)
            tmp.rename(path)
            _remove(old)
        else:
            tmp.rename(path)
        fsync_path(path.parent)
    finally:
        _remove(tmp)


def write_text_atomically(path: Path, text: str) -> None:
    with write_atomically(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def short_error(e: BaseException) -> str:
    """`Type: first line of the message`, for one-line error messages."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def cache_write_failed(what: str, e: BaseException) -> None:
    """A cache that cannot be written (read-only or full disk) costs time later, never the
    run: say so once and go on."""
    from qdpo import console as ui

    ui.warn(f"could not cache the {what} ({short_error(e)}); continuing without the cache. "
            "Set QDPO_CACHE to a writable directory to keep it for later runs.")


# How writers other than Python's own file objects report a full disk: safetensors (Rust) as
# "No space left on device (os error 28)", torch's zip writer as "unexpected pos" (its write
# came up short), quotas as EDQUOT.
_FULL_TEXTS = ("No space left on device", "os error 28", "Disk quota exceeded",
               "os error 122", "unexpected pos")


def disk_full(e: BaseException) -> bool:
    """Whether `e` says the disk (or quota) is full, whichever library raised it."""
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(t in str(e) for t in _FULL_TEXTS)


def write_failed(e: BaseException) -> bool:
    """Whether `e` is the file system refusing a write (full, read-only, no permission): what a
    cache may survive, as opposed to a bug."""
    return isinstance(e, OSError) or disk_full(e)


def folder_size(path: Path) -> int:
    """Bytes of the files under `path` (0 if it is not there)."""
    try:
        return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    except OSError:
        return 0


def human_size(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as disks are sold)."""
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
