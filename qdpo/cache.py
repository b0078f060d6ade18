"""Where qdpo keeps what it can recompute: random-init weights, tokenized data, reference
log-probs. `QDPO_CACHE` moves it; deleting it is always safe."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


def cache_dir() -> Path:
    root = os.environ.get("QDPO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "qdpo")
    return Path(root)


@contextlib.contextmanager
def write_atomically(path: Path) -> Iterator[Path]:
    """Yield a temporary name beside `path`; on success it replaces `path`, and on any error it
    is removed, so readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
