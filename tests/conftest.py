"""Test-session set-up: caches in a temporary directory, so every run starts cold and the
user's ~/.cache is never touched."""

from __future__ import annotations

import os
import tempfile

_CACHE = tempfile.mkdtemp(prefix="qdpo-test-cache-")
os.environ["QDPO_CACHE"] = _CACHE
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
