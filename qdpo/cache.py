"""Where qdpo keeps what it can recompute: random-init weights, tokenized data, reference
log-probs. `QDPO_CACHE` moves it; deleting it is always safe."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("QDPO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "qdpo")
    return Path(root)
