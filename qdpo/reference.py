"""Reference log-probs: online every step, or computed once and cached on disk.

Precomputing runs one no-grad pass over the pairs training will use (larger token budget, no
activation storage) and keeps per-pair reference log-probs. The cache is keyed by everything
that changes them: base weights and revision (for a hub model, the commit the local hub cache
resolves the revision to, so an upstream update is not mistaken for the old weights),
quantization and compute dtype, the starting adapter's bytes, and the tokenized pairs
themselves; the batch layout is not part of the key, since every layout gives the same numbers.
A later run on the same data (a beta sweep, a resumed run, more epochs) loads them and says so.
"""

from __future__ import annotations

import hashlib
import json
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from qdpo import console as ui
from qdpo import distributed
from qdpo.batching import REFERENCE_SCALE, BatchPlan
from qdpo.cache import cache_dir
from qdpo.files import cache_write_failed, write_atomically, write_failed
from qdpo.data import PairTokens
from qdpo.device import autocast_for, synchronize
from qdpo.hub import resolved_commit
from qdpo.logps import SequenceLogps, sequence_logps
from qdpo.model import reference_mode
from qdpo.recipe import Recipe

# Bump when the meaning of a cached number changes (tokenization rules, log-prob definition).
CACHE_VERSION = 1


@dataclass
class ReferenceTable:
    """Per-pair reference log-probs for a data set, indexed by pair id (NaN = not computed)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_public: torch.Tensor
    rejected_public: torch.Tensor
    computed: int = 0  # pairs this run computed (0: everything came from the cache)

    @classmethod
    def empty(cls, n: int) -> "ReferenceTable":
        return cls(*(torch.full((n,), float("nan"), dtype=torch.float32) for _ in range(4)))

    def missing(self, ids: Sequence[int]) -> list[int]:
        return [i for i in ids if torch.isnan(self.chosen[i])]

    def put(self, ids: Sequence[int], lp: SequenceLogps) -> None:
        idx = torch.tensor(list(ids), dtype=torch.long)
        for name in ("chosen", "rejected", "chosen_public", "rejected_public"):
            getattr(self, name)[idx] = getattr(lp, name).detach().float().cpu()

    def get(self, ids: Sequence[int], device: torch.device) -> SequenceLogps:
        """The rows of `ids` on `device` (a table kept there, `on`, copies nothing per call)."""
        idx = torch.tensor(list(ids), dtype=torch.long)
        if self.chosen.device.type == "cuda":  # a pageable copy would wait for the GPU
            idx = idx.pin_memory().to(self.chosen.device, non_blocking=True)
        return SequenceLogps(*(getattr(self, n)[idx].to(device, non_blocking=True) for n in
                               ("chosen", "rejected", "chosen_public", "rejected_public")))

    def on(self, device: torch.device) -> "ReferenceTable":
        """A copy on `device`: training reads a few rows every micro-batch."""
        return ReferenceTable(*(getattr(self, n).to(device) for n in
                                ("chosen", "rejected", "chosen_public", "rejected_public")),
                              computed=self.computed)


def _hash_file_tree(path: Path, h: Any) -> None:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f.suffix in (".safetensors", ".bin", ".json"):
            h.update(f.name.encode())
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)


def cache_key(recipe: Recipe, base_path: str, pairs: Sequence[PairTokens],
              dtype: torch.dtype) -> str:
    h = hashlib.sha256()
    m = recipe.model
    fields = {
        "v": CACHE_VERSION, "base": base_path, "revision": m.revision,
        "random_init_seed": recipe.train.seed if m.random_init else None,
        "quantization": m.quantization, "double_quant": m.double_quant, "dtype": str(dtype),
    }
    # a hub model: the commit its revision (default: main) resolves to in the local hub cache,
    # so an update upstream gets new numbers (local directories are hashed below)
    commit = None if m.random_init else resolved_commit(base_path, m.revision)
    if commit:
        fields["commit"] = commit
    h.update(json.dumps(fields, sort_keys=True).encode())
    local = Path(base_path)
    if local.is_dir():  # weights replaced in place must not reuse old numbers
        if (local / "config.json").exists():
            h.update((local / "config.json").read_bytes())
        for f in sorted(local.glob("*.safetensors")) + sorted(local.glob("*.bin")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    if recipe.lora.init_adapter:
        _hash_file_tree(Path(recipe.resolve_path(recipe.lora.init_adapter)), h)
    for p in pairs:  # lengths first, so the concatenation is unambiguous
        h.update(array("q", (len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids),
                             *p.prompt_ids, *p.chosen_ids, *p.rejected_ids)).tobytes())
    return h.hexdigest()[:24]


def cache_path(key: str) -> Path:
    return cache_dir() / "reference" / f"{key}.safetensors"


def load_cached(key: str, n: int) -> ReferenceTable:
    path = cache_path(key)
    if path.exists():
        try:
            from safetensors.torch import load_file

            d = load_file(str(path))
            if d["chosen"].shape[0] == n:
                return ReferenceTable(d["chosen"], d["rejected"], d["chosen_public"],
                                      d["rejected_public"])
        except Exception:  # a damaged cache is recomputed, never trusted
            pass
    return ReferenceTable.empty(n)


def save_cached(key: str, table: ReferenceTable) -> None:
    from safetensors.torch import save_file

    with write_atomically(cache_path(key)) as tmp:  # safetensors: reading it runs no code
        save_file({"chosen": table.chosen, "rejected": table.rejected,
                   "chosen_public": table.chosen_public,
                   "rejected_public": table.rejected_public}, str(tmp))


def precompute(model: Any, table: ReferenceTable, ids: Sequence[int], data: Sequence[PairTokens],
               plan: BatchPlan, device: torch.device, autocast: Any,
               progress: Callable[[int], None] | None = None) -> int:
    """Fill the table for `ids` that are missing; returns how many pairs were computed.

    `plan` is the reference plan (a scaled copy of the training plan: no activations are kept).
    """
    todo = table.missing(sorted(set(ids)))
    if not todo and not distributed.is_sharded(model):
        return 0
    # sharded weights: a rank with less (or nothing) to do keeps pace with fillers
    batches = distributed.lockstep(model, plan.micro_batches(todo, data),
                                   lambda: next(plan.micro_batches([0], data)))
    with reference_mode(model), autocast:  # eval mode: no dropout in the reference
        for batch, real in batches:
            logps = sequence_logps(model, batch.to(device))
            if real:
                table.put(batch.pair_ids, logps)
                if progress:
                    progress(batch.num_pairs)
    return len(todo)


def _share_rows(table: ReferenceTable, mine: Sequence[int]) -> None:
    """Give every rank the rows the others computed."""
    names = ("chosen", "rejected", "chosen_public", "rejected_public")
    idx = torch.tensor(list(mine), dtype=torch.long)
    rows = {n: getattr(table, n)[idx].tolist() for n in names}
    for ids, part in distributed.gather((list(mine), rows)):
        at = torch.tensor(ids, dtype=torch.long)
        for n in names:
            getattr(table, n)[at] = torch.tensor(part[n], dtype=torch.float32)


def ensure(model: Any, data: Sequence[PairTokens], ids: Sequence[int], plan: BatchPlan,
           device: torch.device, dtype: torch.dtype, key: str | None = None,
           what: str = "train") -> tuple[ReferenceTable, float]:
    """Reference log-probs of `ids`, loaded from the cache under `key` or computed and cached.

    Returns the table and the seconds spent. `key` None (random benchmark weights) computes
    without touching the disk cache. `plan` is the training plan; the pass scales it itself.
    """
    t0 = time.monotonic()
    table = load_cached(key, len(data)) if key else ReferenceTable.empty(len(data))
    wanted = sorted(set(ids))
    missing = table.missing(wanted)
    if not missing:
        if key:
            ui.info(f"reference: {what} log-probs reused from cache ({len(wanted)} pairs, "
                    f"{cache_path(key)})")
        return table.on(device), time.monotonic() - t0
    r = distributed.ranks()  # several ranks: each computes its share, then all have all
    mine = distributed.share(missing, [data[i].num_tokens for i in missing], r)
    with ui.task_progress(f"reference pass ({what})", len(mine)) as advance:
        precompute(model, table, mine, data, plan.scaled(REFERENCE_SCALE), device,
                   autocast_for(device, dtype), advance)
    if r.active:
        _share_rows(table, mine)
    table.computed = len(missing)
    synchronize(device)
    dt = time.monotonic() - t0
    if key and r.is_main:  # the same cache a one-process run reads and writes
        cached = "; cached for later runs"
        try:
            save_cached(key, table)
        except Exception as e:  # a full or read-only disk costs the cache, not the run
            if not write_failed(e):
                raise
            cache_write_failed("reference log-probs", e)
            cached = ""
        reused = len(wanted) - len(missing)
        ui.info(f"reference: {what} log-probs for {ui.plural(len(missing), 'pair')} computed "
                f"in {dt:.1f} s"
                + (f" ({reused} reused from cache)" if reused else "") + cached)
    return table.on(device), dt
