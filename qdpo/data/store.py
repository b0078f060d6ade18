"""The tokenization cache: a fingerprint of everything the tokenized pairs depend on, and the
pairs stored under it in safetensors (numbers only) with the reports as JSON metadata, a format
that cannot run code when read, unlike pickle."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from array import array
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qdpo.cache import cache_dir
from qdpo.data.pairs import PairTokens, PreparedData
from qdpo.data.read import Resolve, local_files
from qdpo.data.report import DataReport
from qdpo.files import write_atomically
from qdpo.hub import resolved_commit

if TYPE_CHECKING:
    from qdpo.recipe import DataConfig, EvalConfig

# Bumped when the same inputs would tokenize differently: 2 = the system prompt is kept (as
# plain text) when the tokenizer has no chat template; 3 = a `system` column is used without
# being mapped, a directory's split picks its files, a named prompt column is never guessed;
# 6 = a prompt whose template head is too long to keep still keeps its BOS; 7 = null prompts
# beside message lists skipped, "Prompt" used for message lists, NUL texts and ragged CSV
# lines skipped; 8 = a template head over half of max_prompt_length is kept when some of the
# newest content still fits beside it; 9 = a system turn too long to keep keeps its role
# header.
DATA_CACHE_VERSION = 9
_COUNTERS = ("skipped", "formats", "origins")


def content_hash(path: Path) -> str:
    """sha256 of a file's bytes. Size and modification time are not enough: chosen and
    rejected swapped in place, with the time restored, would train on the old pairs, reversed.
    Hashing runs at disk speed (a 250 MB parquet file takes about 0.2 s)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint_inputs(data: DataConfig, eval: EvalConfig, tokenizer: Any, *, seed: int,
                       resolve: Resolve) -> list[str]:
    """Everything the tokenized pairs depend on, in order: the data and eval settings and the
    seed, each source (local files by path and content hash; hub sets by id, split, config,
    revision and the commit it resolves to), and the tokenizer with its chat template. The
    one place to add an input."""
    settings = {"v": DATA_CACHE_VERSION, "data": dataclasses.asdict(data),
                "eval": dataclasses.asdict(eval), "seed": seed}
    parts = [json.dumps(settings, sort_keys=True, default=str)]
    for src in data.train + eval.data:
        path = resolve(src.path)
        files = local_files(path, src.split)
        if files is None:  # a hub set: by the commit the local hub cache resolves it to
            commit = resolved_commit(path, src.revision, "dataset")
            parts.append(f"hub:{path}:{src.split}:{src.name}:{src.revision}:{commit}")
            continue
        for f in files:
            parts.append(f"{f.resolve()}:{content_hash(f)}")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts.append(backend.to_str() if backend is not None else repr(tokenizer.get_vocab()))
    parts.append(str(getattr(tokenizer, "chat_template", "")))
    parts.append(f"{tokenizer.eos_token}|{tokenizer.bos_token}")
    return parts


def data_fingerprint(data: DataConfig, eval: EvalConfig, tokenizer: Any, *, seed: int,
                     resolve: Resolve) -> str:
    h = hashlib.sha256()
    for part in fingerprint_inputs(data, eval, tokenizer, seed=seed, resolve=resolve):
        h.update(part.encode())
    return h.hexdigest()[:24]


def cache_file(key: str) -> Path:
    return cache_dir() / "data" / f"{key}.safetensors"


def _pairs_to_arrays(pairs: list[PairTokens], prefix: str) -> dict[str, Any]:
    """Token ids of all pairs as one flat int32 array plus per-pair lengths and weights."""
    import numpy as np

    flat = array("i")
    lengths = array("q")
    for p in pairs:
        flat.extend(p.prompt_ids)
        flat.extend(p.chosen_ids)
        flat.extend(p.rejected_ids)
        lengths.extend((len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)))
    return {f"{prefix}.ids": np.frombuffer(flat, dtype=np.int32) if flat else
            np.zeros(0, np.int32),
            f"{prefix}.lengths": np.frombuffer(lengths, dtype=np.int64).reshape(-1, 3)
            if lengths else np.zeros((0, 3), np.int64),
            f"{prefix}.weights": np.array([p.weight for p in pairs], dtype=np.float64)}


def _pairs_from_arrays(arrays: dict[str, Any], prefix: str) -> list[PairTokens]:
    ids = arrays[f"{prefix}.ids"].tolist()
    out, pos = [], 0
    for (lp, lc, lr), w in zip(arrays[f"{prefix}.lengths"].tolist(),
                               arrays[f"{prefix}.weights"].tolist()):
        out.append(PairTokens(ids[pos:pos + lp], ids[pos + lp:pos + lp + lc],
                              ids[pos + lp + lc:pos + lp + lc + lr], w))
        pos += lp + lc + lr
    return out


def _report_to_dict(r: DataReport | None) -> dict[str, Any] | None:
    if r is None:
        return None
    # not dataclasses.asdict: it rebuilds a Counter from its (key, count) pairs, counting them
    d = {f.name: getattr(r, f.name) for f in dataclasses.fields(r)}
    for k in _COUNTERS:  # keys may be tuples: keep them as [key, count] pairs
        d[k] = [[list(key) if isinstance(key, tuple) else key, n] for key, n in d[k].items()]
    return d


def _report_from_dict(d: dict[str, Any] | None) -> DataReport | None:
    if d is None:
        return None
    d = dict(d)
    for k in _COUNTERS:
        d[k] = Counter({tuple(key) if isinstance(key, list) else key: n
                        for key, n in d.get(k, [])})
    return DataReport(**d)


def write_cache(path: Path, data: PreparedData) -> None:
    from safetensors.numpy import save_file

    arrays = {**_pairs_to_arrays(data.train, "train"), **_pairs_to_arrays(data.eval, "eval")}
    meta = {"reports": json.dumps({"train": _report_to_dict(data.train_report),
                                   "eval": _report_to_dict(data.eval_report),
                                   "conversational": data.tokenizer.conversational})}
    with write_atomically(path) as tmp:
        save_file(arrays, str(tmp), metadata=meta)


def read_cache(path: Path, settings: DataConfig, tokenizer: Any) -> PreparedData:
    from safetensors import safe_open

    from qdpo.data.encode import Tokenizer

    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads(f.metadata()["reports"])
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    report = _report_from_dict(meta["train"])
    report.cached = True
    return PreparedData(_pairs_from_arrays(arrays, "train"), _pairs_from_arrays(arrays, "eval"),
                        report, _report_from_dict(meta["eval"]),
                        Tokenizer(tokenizer, settings, meta["conversational"]))
