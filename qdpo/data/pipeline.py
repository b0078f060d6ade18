"""The whole data step, as the trainer, `qdpo data` and `qdpo eval` call it: read every source,
normalise, mix, shuffle, hold out eval pairs, tokenize, or reuse the cached result.

The functions take the data settings (`recipe.data`, and `recipe.eval` for held-out data), the
seed and a path resolver; `prepare` and `prepare_sources` are the conveniences that unpack a
recipe for the callers that have one.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qdpo.data.encode import Tokenizer
from qdpo.data.normalise import normalise_rows
from qdpo.data.pairs import Pair, PairTokens, PreparedData
from qdpo.data.read import Resolve, read_rows
from qdpo.data.report import DataReport
from qdpo.data.store import cache_file, data_fingerprint, read_cache, write_cache
from qdpo.errors import DataError
from qdpo.files import cache_write_failed, write_failed
from qdpo.recipe import MAX_SOURCE_PAIRS

if TYPE_CHECKING:
    from qdpo.recipe import DataConfig, DataSource, EvalConfig, Recipe


def _sample(got: list[Pair], want: int, rng: random.Random) -> list[Pair]:
    """`want` of the pairs: a sample, or every pair as often as fits and the rest at random."""
    if want <= len(got):
        return rng.sample(got, want)
    reps, rest = divmod(want, len(got))
    return got * reps + rng.sample(got, rest)


def _wanted(s: DataSource, got: list[Pair], name: str) -> int:
    """How many pairs a source gives: its samples, or its pairs scaled by its weight. The
    recipe bounds both, but a large source times a large weight (or a DataSource built in
    code) could still ask for billions of copies, which would never finish tokenizing."""
    want = s.samples if s.samples is not None else len(got) * s.weight
    if not want <= MAX_SOURCE_PAIRS:  # also NaN and inf
        how = f"samples {s.samples:,}" if s.samples is not None else \
            f"weight {s.weight:g} times its {len(got):,} pairs"
        count = f"{want:,.0f}" if want < 1e15 else f"about {want:.2g}"
        raise DataError(f"Data source '{name}' would give {count} pairs ({how}): more "
                        f"than the {MAX_SOURCE_PAIRS:,} one source may give. Lower its "
                        "weight, or set its samples to the number of pairs you want.")
    return round(want)


def load_pairs(sources: list[DataSource], settings: DataConfig, report: DataReport, *,
               seed: int, resolve: Resolve) -> list[Pair]:
    """All sources' pairs, each scaled by its weight or cut to its sample count."""
    pairs: list[Pair] = []
    names = [Path(s.path).name for s in sources]
    for k, s in enumerate(sources):
        rows = read_rows(s, resolve)
        name = names[k] if names.count(names[k]) == 1 else s.path  # keep namesakes apart
        got = normalise_rows(rows, settings, report, seed=seed, source=name, columns=s.columns)
        want = _wanted(s, got, name)
        if got and want != len(got):
            got = _sample(got, want, random.Random(seed * 7919 + k))
            report.mixed[name] = len(got)
        pairs.extend(got)
    return pairs


def _nothing_left(report: DataReport, what: str) -> DataError:
    why = "; ".join(report.examples[:3]) or "the sources hold no rows"
    return DataError(f"No usable {what} pair in the data ({report.rows} rows read). First "
                     f"problems: {why}.")


def _refuse_identical(pairs: list[PairTokens], what: str) -> None:
    """Rows whose chosen equals rejected are skipped when read; if most pairs are still equal
    once rendered and tokenized, the chat template or the column mapping lost the responses,
    and training would learn nothing (or noise)."""
    same = sum(p.chosen_ids == p.rejected_ids for p in pairs)
    if pairs and same * 2 > len(pairs):
        raise DataError(
            f"{same} of {len(pairs)} {what} pairs have the same tokens for chosen and rejected "
            "once rendered: there is nothing to prefer. The chat template probably drops the "
            "message content (check data.chat_template, and `qdpo data` shows the rendered "
            "text), or data.columns maps chosen and rejected to the same field.")


def _conversational(pairs: list[Pair]) -> bool:
    return any(not isinstance(p.prompt, str) for p in pairs)


def _held_out(pairs: list[Pair], settings: DataConfig, eval: EvalConfig, *, seed: int,
              resolve: Resolve) -> tuple[list[Pair], list[Pair], DataReport | None]:
    """(training pairs, eval pairs, eval report): eval.data when given, else
    eval.split_fraction of the (shuffled) training pairs, else none."""
    if eval.data:
        report = DataReport(strict=settings.strict)
        held = load_pairs(eval.data, settings, report, seed=seed, resolve=resolve)
        if not held:
            raise _nothing_left(report, "eval")
        return pairs, held, report
    if eval.split_fraction > 0:
        n = max(1, int(len(pairs) * eval.split_fraction))
        if n >= len(pairs):
            raise DataError(f"eval.split_fraction={eval.split_fraction} leaves no "
                            f"training pair out of {len(pairs)}.")
        return pairs[n:], pairs[:n], DataReport(rows=n)
    return pairs, [], None


def _pair_key(p: Pair) -> str:
    return json.dumps([p.prompt, p.chosen, p.rejected], sort_keys=True, ensure_ascii=False)


def _count_overlap(pairs: list[Pair], held: list[Pair], *reports: DataReport | None) -> None:
    """How many eval pairs are also training pairs (same prompt and responses): eval.data
    that is a split of the training data, or duplicate rows across eval.split_fraction."""
    if not held:
        return
    seen = {_pair_key(p) for p in pairs}
    n = sum(_pair_key(p) in seen for p in held)
    for report in reports:
        if report is not None:
            report.eval_overlap, report.eval_pairs = n, len(held)


def _prepare(settings: DataConfig, eval: EvalConfig, tokenizer: Any, *, seed: int,
             resolve: Resolve, progress: Any = None) -> PreparedData:
    report = DataReport(strict=settings.strict)
    pairs = load_pairs(settings.train, settings, report, seed=seed, resolve=resolve)
    if not pairs:
        raise _nothing_left(report, "training")
    random.Random(seed).shuffle(pairs)
    pairs, eval_pairs, eval_report = _held_out(pairs, settings, eval, seed=seed,
                                               resolve=resolve)
    if settings.max_pairs:
        pairs = pairs[: settings.max_pairs]
    if eval.max_pairs:
        eval_pairs = eval_pairs[: eval.max_pairs]
    _count_overlap(pairs, eval_pairs, report, eval_report)
    tok = Tokenizer(tokenizer, settings, _conversational(pairs + eval_pairs))
    train = tok(pairs, report, progress)
    if not train:
        raise _nothing_left(report, "training")
    _refuse_identical(train, "training")
    ev = tok(eval_pairs, eval_report, progress) if eval_pairs and eval_report is not None \
        else []
    return PreparedData(train, ev, report, eval_report, tok)


def prepare_data(settings: DataConfig, eval: EvalConfig, tokenizer: Any, *, seed: int,
                 resolve: Resolve, use_cache: bool = True, progress: Any = None) -> PreparedData:
    """Read, normalise and tokenize train and eval data, or reuse the cached result."""
    key = data_fingerprint(settings, eval, tokenizer, seed=seed, resolve=resolve) \
        if use_cache else None
    if key is not None and cache_file(key).exists():
        try:
            return _warn_overlap(read_cache(cache_file(key), settings, tokenizer))
        except Exception:  # a damaged cache is rebuilt, never trusted
            pass
    data = _prepare(settings, eval, tokenizer, seed=seed, resolve=resolve, progress=progress)
    if key is not None:
        try:
            write_cache(cache_file(key), data)
        except Exception as e:  # a full or read-only disk costs the cache, not the run
            if not write_failed(e):
                raise
            cache_write_failed("tokenized data", e)
    return _warn_overlap(data)


def _warn_overlap(data: PreparedData) -> PreparedData:
    note = data.train_report.overlap_note()
    if note:
        from qdpo import console

        console.warn(note)
    return data


def prepare(recipe: Recipe, tokenizer: Any, use_cache: bool = True,
            progress: Any = None) -> PreparedData:
    """`prepare_data` with a recipe's data and eval settings, seed and paths."""
    return prepare_data(recipe.data, recipe.eval, tokenizer, seed=recipe.train.seed,
                        resolve=recipe.resolve_path, use_cache=use_cache, progress=progress)


def tokenize_sources(sources: list[DataSource], settings: DataConfig, tokenizer: Any, *,
                     seed: int, resolve: Resolve,
                     what: str = "eval") -> tuple[list[PairTokens], DataReport]:
    """Tokenized pairs of some sources, in order, with the given data settings."""
    report = DataReport(strict=settings.strict)
    pairs = load_pairs(sources, settings, report, seed=seed, resolve=resolve)
    if not pairs:
        raise _nothing_left(report, what)
    out = Tokenizer(tokenizer, settings, _conversational(pairs))(pairs, report)
    if not out:
        raise _nothing_left(report, what)
    _refuse_identical(out, what)
    return out, report


def prepare_sources(sources: list[DataSource], recipe: Recipe, tokenizer: Any,
                    what: str = "eval") -> tuple[list[PairTokens], DataReport]:
    """`tokenize_sources` with a recipe's data settings, seed and paths (qdpo eval)."""
    return tokenize_sources(sources, recipe.data, tokenizer, seed=recipe.train.seed,
                            resolve=recipe.resolve_path, what=what)


def length_stats(pairs: list[PairTokens]) -> dict[str, dict[str, int]]:
    """p50 / p95 / max token lengths of prompt, chosen and rejected."""
    def pct(vals: list[int], q: float) -> int:
        vals = sorted(vals)
        return vals[min(len(vals) - 1, int(round(q * (len(vals) - 1))))] if vals else 0

    out = {}
    for name, get in (("prompt", lambda p: len(p.prompt_ids)),
                      ("chosen", lambda p: len(p.chosen_ids)),
                      ("rejected", lambda p: len(p.rejected_ids))):
        vals = [get(p) for p in pairs]
        out[name] = {"p50": pct(vals, 0.5), "p95": pct(vals, 0.95), "max": max(vals, default=0)}
    return out
