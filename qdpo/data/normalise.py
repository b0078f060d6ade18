"""Normalising rows to pairs: whatever a row looks like, one `Pair` (prompt, chosen reply,
rejected reply, weight) or one counted skip with its reason.

A row goes through the steps in `STEPS` in order; each reads or fills in a `_Row` and returns
None to go on, or the reason to skip the row. The reasons are what `DataReport` counts and
shows, so their wording is part of the interface.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from qdpo.data.pairs import Pair
from qdpo.data.report import DataReport
from qdpo.data.shapes import (
    check_messages,
    completion_text,
    hh_messages,
    is_messages,
    ranked_pair,
    split_shared_text,
)

if TYPE_CHECKING:
    from qdpo.recipe import DataConfig

_DEFAULT_COLUMNS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected",
                    "weight": "weight", "responses": "completions", "scores": "scores"}
_PROMPT_FALLBACKS = ("instruction", "question", "input")


@dataclass
class _Context:
    """What every row of one source is read with."""

    cols: dict[str, str]
    prompt_mapped: bool
    format: str
    pair_selection: str
    rng: random.Random
    report: DataReport


@dataclass
class _Row:
    """One row on its way to a Pair."""

    row: dict[str, Any]
    prompt: Any = None
    chosen_raw: Any = None
    rejected_raw: Any = None
    chosen: str = ""
    rejected: str = ""
    chosen_prefix: Any = None
    rejected_prefix: Any = None
    weight: float = 1.0
    system: str | None = None


def _prompt_fallback(r: _Row, c: _Context) -> str | None:
    """No prompt column: take "instruction", "question" or "input" when the row has one."""
    if c.prompt_mapped or c.cols["prompt"] in r.row:
        return None
    alt = next((k for k in _PROMPT_FALLBACKS if k in r.row), None)
    if alt is not None and (c.cols["chosen"] not in r.row or c.cols["rejected"] not in r.row
                            or isinstance(r.row.get(c.cols["chosen"]), str)):
        r.row = dict(r.row, **{c.cols["prompt"]: r.row[alt]})
    return None


def _rank_responses(r: _Row, c: _Context) -> str | None:
    """No chosen/rejected but scored responses: pick the pair by data.pair_selection."""
    cols, row = c.cols, r.row
    if (cols["chosen"] in row and cols["rejected"] in row) or not (
            cols["responses"] in row or "responses" in row):
        return None
    responses = row[cols["responses"]] if cols["responses"] in row else row["responses"]
    picked = ranked_pair(responses, row.get(cols["scores"]), c.pair_selection, c.rng)
    if isinstance(picked, str):
        return picked
    r.row = dict(row, **{cols["chosen"]: picked[0], cols["rejected"]: picked[1]})
    c.report.formats["ranked"] += 1
    return None


def _take_columns(r: _Row, c: _Context) -> str | None:
    missing = [k for k in (c.cols["chosen"], c.cols["rejected"]) if k not in r.row]
    if missing:
        return (f"missing column {', '.join(repr(m) for m in missing)} (columns: "
                f"{', '.join(map(str, r.row))}; map yours with data.columns)")
    r.prompt = r.row.get(c.cols["prompt"])
    r.chosen_raw, r.rejected_raw = r.row[c.cols["chosen"]], r.row[c.cols["rejected"]]
    return None


def _implicit_text_prompt(r: _Row, c: _Context) -> str | None:
    """No prompt, two texts: HH-RLHF dialogues, or texts sharing a prefix."""
    if r.prompt is not None or not (isinstance(r.chosen_raw, str)
                                    and isinstance(r.rejected_raw, str)):
        return None
    hc, hr = hh_messages(r.chosen_raw), hh_messages(r.rejected_raw)
    if hc and hr and c.format != "standard":
        r.chosen_raw, r.rejected_raw = hc, hr
        c.report.formats["implicit (HH dialogue)"] += 1
        return None
    split = split_shared_text(r.chosen_raw, r.rejected_raw)
    if split is None:
        return "missing prompt (and chosen/rejected share no prefix)"
    r.prompt, r.chosen_raw, r.rejected_raw = split
    c.report.formats["implicit (shared text prefix)"] += 1
    return None


def _replies(r: _Row, c: _Context) -> str | None:
    """Each side's reply text, and the conversation it carries before the reply."""
    chosen, err, r.chosen_prefix = completion_text(r.chosen_raw, "chosen")
    if err:
        return err
    rejected, err, r.rejected_prefix = completion_text(r.rejected_raw, "rejected")
    if err:
        return err
    r.chosen, r.rejected = chosen or "", rejected or ""
    if r.prompt is not None and r.chosen_prefix is not None and r.rejected_prefix is not None \
            and r.chosen_prefix != r.rejected_prefix:
        return "chosen and rejected carry different conversations"
    return None


def _conversation_prompt(r: _Row, c: _Context) -> str | None:
    """The prompt from the conversation both sides carry, where the row has none (or, e.g.
    UltraFeedback, a prompt string beside full, possibly multi-turn, conversations)."""
    same = r.chosen_prefix is not None and r.chosen_prefix == r.rejected_prefix
    if r.prompt is None or (isinstance(r.prompt, str) and not r.prompt and r.chosen_prefix):
        if not same:
            return "missing prompt (and chosen/rejected do not share a conversation prefix)"
        r.prompt = r.chosen_prefix
    if isinstance(r.prompt, str) and same and c.format != "standard":
        r.prompt = r.chosen_prefix
    return None


def _message_prompt(r: _Row, c: _Context) -> str | None:
    err = check_messages(r.prompt, "prompt")
    if err:
        return err
    if c.format == "standard":
        return "prompt is a message list but data.format is standard"
    prefix = r.chosen_prefix
    if prefix is not None and prefix != r.prompt and prefix[: len(r.prompt)] == r.prompt:
        r.prompt = prefix  # chosen carried the whole conversation
    c.report.formats["conversational"] += 1
    return None


def _text_prompt(r: _Row, c: _Context) -> str | None:
    if c.format == "conversational":
        return "prompt is text but data.format is conversational"
    if not r.prompt.strip():
        return "empty prompt"
    c.report.formats["standard"] += 1
    return None


def _prompt_shape(r: _Row, c: _Context) -> str | None:
    """A message list or a text, as data.format allows."""
    if is_messages(r.prompt):
        return _message_prompt(r, c)
    if isinstance(r.prompt, str):
        return _text_prompt(r, c)
    return f"prompt is a {type(r.prompt).__name__}, not text or messages"


def _distinct_replies(r: _Row, c: _Context) -> str | None:
    if not r.chosen.strip() or not r.rejected.strip():
        return "empty chosen or rejected"
    if r.chosen == r.rejected:
        return "chosen identical to rejected"
    return None


def _weight(r: _Row, c: _Context) -> str | None:
    value = r.row.get(c.cols["weight"]) if c.cols["weight"] in r.row else None
    if value is None:
        return None
    try:
        r.weight = float(value)
    except (TypeError, ValueError, OverflowError):
        r.weight = math.nan
    if not math.isfinite(r.weight) or r.weight < 0:
        return "weight is not a finite number >= 0"
    return None


def _row_system(r: _Row, c: _Context) -> str | None:
    """A mapped system column: the row's own system message, unless its prompt has one."""
    column = c.cols.get("system")
    text = r.row.get(column) if column else None
    if isinstance(text, str) and text.strip() and (
            isinstance(r.prompt, str) or r.prompt[0]["role"] != "system"):
        r.system = text
    return None


def _valid_unicode(r: _Row, c: _Context) -> str | None:
    texts = [r.prompt] if isinstance(r.prompt, str) else [m["content"] for m in r.prompt]
    try:
        for t in texts + [r.chosen, r.rejected, r.system or ""]:
            t.encode("utf-8")
    except UnicodeEncodeError:
        return "text is not valid Unicode (a lone surrogate, e.g. a cut emoji)"
    return None


STEPS: tuple[Callable[[_Row, _Context], str | None], ...] = (
    _prompt_fallback, _rank_responses, _take_columns, _implicit_text_prompt, _replies,
    _conversation_prompt, _prompt_shape, _distinct_replies, _weight, _row_system,
    _valid_unicode,
)


def _normalise_row(row: Any, c: _Context) -> _Row | str:
    """The row's pieces after every step, or the reason it is skipped."""
    if not isinstance(row, dict):
        return "row is not an object"
    r = _Row(row)
    for step in STEPS:
        reason = step(r, c)
        if reason is not None:
            return reason
    return r


def normalise_rows(rows: list[Any], settings: DataConfig, report: DataReport, *, seed: int,
                   source: str = "", columns: dict[str, str] | None = None) -> list[Pair]:
    """Pairs of the usable rows; every other row is counted in `report` with its reason (or,
    with data.strict, stops everything). `seed` draws the rejected response for
    data.pair_selection best_vs_random; `columns` is one source's own mapping."""
    cols = {**_DEFAULT_COLUMNS, **settings.columns, **(columns or {})}
    ctx = _Context(cols, "prompt" in settings.columns or "prompt" in (columns or {}),
                   settings.format, settings.pair_selection, random.Random(seed), report)
    pairs = []
    for i, row in enumerate(rows):
        report.rows += 1
        r = _normalise_row(row, ctx)
        if isinstance(r, str):
            report.skip(r, f"{source} row {i + 1}" if source else f"row {i + 1}")
            continue
        pairs.append(Pair(r.prompt, r.chosen, r.rejected, r.weight, i + 1, source, r.system))
    return pairs
