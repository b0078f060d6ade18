"""Preference data: read rows, normalise them to (prompt, chosen, rejected), tokenize.

One room per concern:

    pairs.py      Pair, PairTokens, PreparedData: what the rooms hand each other (a leaf)
    report.py     DataReport: counts, skip reasons, notes
    read.py       rows from local .jsonl/.json/.parquet/.csv files and hub datasets
    shapes.py     row shapes hiding the prompt or the pair (HH dialogues, shared prefixes,
                  scored responses) and message checks
    normalise.py  rows -> Pairs, as a sequence of small named steps
    encode.py     chat templates and Tokenizer: Pairs -> PairTokens
    store.py      the fingerprint and the tokenization cache
    pipeline.py   prepare / prepare_sources: the whole step, cached

Importing this package (or `PairTokens` from it) loads only pairs.py; every other name is
imported on first use, so batching, the reference cache and the benchmarks stay light.
Nothing here knows about the model, and only `prepare` / `prepare_sources` take a recipe.
"""

from __future__ import annotations

import importlib
from typing import Any

from qdpo.data.pairs import Pair, PairTokens, PreparedData

_LAZY = {
    "DataReport": "report",
    "read_rows": "read",
    "local_files": "read",
    "ROLES": "shapes",
    "normalise_rows": "normalise",
    "invalid_unicode": "normalise",
    "NOT_UNICODE": "normalise",
    "CHAT_TEMPLATES": "encode",
    "Tokenizer": "encode",
    "resolve_chat_template": "encode",
    "DATA_CACHE_VERSION": "store",
    "data_fingerprint": "store",
    "fingerprint_inputs": "store",
    "load_pairs": "pipeline",
    "prepare": "pipeline",
    "prepare_data": "pipeline",
    "prepare_sources": "pipeline",
    "tokenize_sources": "pipeline",
    "length_stats": "pipeline",
}

__all__ = ["Pair", "PairTokens", "PreparedData", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qdpo.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"qdpo.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
