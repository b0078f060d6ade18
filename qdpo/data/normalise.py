"""Normalising rows to pairs: whatever a row looks like, one `Pair` (prompt, chosen reply,
rejected reply, weight) or one counted skip with its reason.

A row goes through the steps in `STEPS` in order; each reads or fills in a `_Row` and returns
None to go on, or the reason to skip the row. The reasons are what `DataReport` counts and
shows, so their wording is part of the interface.
"""

from __future__ import annotations

import difflib
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

from qdpo.data.pairs import BadLine, Pair
from qdpo.data.report import DataReport
from qdpo.data.shapes import (
    check_messages,
    completion_text,
    hh_messages,
    is_messages,
    ranked_pair,
    split_shared_text,
)
from qdpo.errors import DataError

if TYPE_CHECKING:
    from qdpo.recipe import DataConfig

_DEFAULT_COLUMNS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected",
                    "weight": "weight", "responses": "completions", "scores": "scores",
                    "system": "system"}
_PROMPT_FALLBACKS = ("instruction", "question", "input")


@dataclass
class _Context:
    """What every row of one source is read with."""

    cols: dict[str, str]
    prompt_mapped: bool  # a prompt column was named: never guess the prompt
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
    prompt_from: str = ""  # which rule built the prompt, as the report says it
    pair_from: str = ""  # where chosen and rejected came from, when not their own columns


def _prompt_fallback(r: _Row, c: _Context) -> str | None:
    """No `prompt` column: the prompt column in another case ("Prompt", "PROMPT"), else
    "instruction", "question" or "input", is the prompt, whether the replies are texts or
    message lists; only a row with none of them has its prompt guessed. Null there: skipped."""
    if c.prompt_mapped or c.cols["prompt"] in r.row:
        return None
    names = (c.cols["prompt"],) + _PROMPT_FALLBACKS
    found = {name: [k for k in r.row if isinstance(k, str) and k.lower() == name]
             for name in names}
    alts = next((ks for ks in found.values() if ks), None)
    if alts is None:
        return None
    if len(alts) > 1:  # "Prompt" and "PROMPT": which one the user meant is theirs to say
        return (f"several prompt columns ({', '.join(repr(k) for k in alts)}; map one with "
                "data.columns.prompt)")
    alt = alts[0]
    if r.row[alt] is None:
        return f"prompt column '{alt}' is null"
    r.row = dict(r.row, **{c.cols["prompt"]: r.row[alt]})
    r.prompt_from = f"column '{alt}'"
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
    r.pair_from = f"column '{cols['responses'] if cols['responses'] in row else 'responses'}'" \
        " (ranked by score)"
    c.report.formats["ranked"] += 1
    return None


def _take_columns(r: _Row, c: _Context) -> str | None:
    """chosen, rejected and the prompt from their columns; a named prompt column must be
    there, since without it the prompt would be guessed."""
    needed = ("prompt", "chosen", "rejected") if c.prompt_mapped else ("chosen", "rejected")
    missing = [c.cols[k] for k in needed if c.cols[k] not in r.row]
    if missing:
        return (f"missing column {', '.join(repr(m) for m in missing)} (columns: "
                f"{', '.join(map(str, r.row))}; map yours with data.columns)")
    r.prompt = r.row.get(c.cols["prompt"])
    if r.prompt is not None and not r.prompt_from:
        r.prompt_from = f"column '{c.cols['prompt']}'"
    r.chosen_raw, r.rejected_raw = r.row[c.cols["chosen"]], r.row[c.cols["rejected"]]
    return None


def _null_prompt(r: _Row, c: _Context) -> str | None:
    """A prompt column that is there but null on this row: skipped, in every format. Guessing
    the prompt from the replies (the rule for data without a prompt column) could train on a
    wrong prompt, and the user gave no sign that this row has none."""
    if r.prompt is None and c.cols["prompt"] in r.row:
        return f"prompt column '{c.cols['prompt']}' is null"
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
        r.prompt_from = "Human/Assistant turns of chosen and rejected (no prompt column)"
        return None
    split = split_shared_text(r.chosen_raw, r.rejected_raw)
    if split is None:
        return "missing prompt (and chosen/rejected share no prefix)"
    r.prompt, r.chosen_raw, r.rejected_raw = split
    r.prompt_from = "shared start of chosen and rejected (no prompt column)"
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
    conversation = "conversation before the reply in chosen and rejected"
    if r.prompt is None or (isinstance(r.prompt, str) and not r.prompt and r.chosen_prefix):
        if not same:
            return "missing prompt (and chosen/rejected do not share a conversation prefix)"
        if not r.prompt_from.startswith("Human/"):  # HH turns became this conversation
            r.prompt_from = conversation + (
                f" ({r.prompt_from} empty)" if r.prompt_from else " (no prompt column)")
        r.prompt = r.chosen_prefix
    if isinstance(r.prompt, str) and same and c.format != "standard":
        r.prompt = r.chosen_prefix
        r.prompt_from = f"{conversation} (beside {r.prompt_from})"
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
    value = r.row.get(c.cols["weight"])
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
    """The system column (`system` unless mapped, as in Orca data): the row's own system
    message, unless its prompt has one."""
    text = r.row.get(c.cols["system"])
    if isinstance(text, str) and text.strip() and (
            isinstance(r.prompt, str) or r.prompt[0]["role"] != "system"):
        r.system = text
    return None


NOT_UNICODE = "text is not valid Unicode (a lone surrogate, e.g. a cut emoji)"


def invalid_unicode(texts: Iterable[str]) -> bool:
    """Whether any text holds a lone surrogate (what invalid UTF-8 decodes to with
    surrogateescape): tokenizers refuse it. Data rows and prompts files check the same way."""
    try:
        for t in texts:
            t.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


NUL_TEXT = "text holds a NUL character (\\x00)"


def _texts(r: _Row) -> list[str]:
    texts = [r.prompt] if isinstance(r.prompt, str) else [m["content"] for m in r.prompt]
    return texts + [r.chosen, r.rejected, r.system or ""]


def _valid_unicode(r: _Row, c: _Context) -> str | None:
    return NOT_UNICODE if invalid_unicode(_texts(r)) else None


def _no_nul(r: _Row, c: _Context) -> str | None:
    """A NUL is no text a model should learn: the trace of a binary file or a broken export
    (and C code behind tokenizers and exports may end a string there). Skipped and counted,
    as invalid Unicode is, in every format."""
    return NUL_TEXT if any("\x00" in t for t in _texts(r)) else None


STEPS: tuple[Callable[[_Row, _Context], str | None], ...] = (
    _prompt_fallback, _rank_responses, _take_columns, _null_prompt, _implicit_text_prompt,
    _replies, _conversation_prompt, _prompt_shape, _distinct_replies, _weight, _row_system,
    _valid_unicode, _no_nul,
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


def check_named_columns(rows: list[Any], named: dict[str, tuple[str, str]],
                        source: str) -> None:
    """Every column the user named (field -> (column, the key that named it)) is in the
    data, or one DataError with the columns there are and the closest one. A named column
    that is absent would otherwise mean a guessed prompt, or weights or system messages
    silently left out."""
    present: dict[str, None] = {}
    for row in rows:
        if isinstance(row, dict):
            present.update(dict.fromkeys(map(str, row)))
    if not present:
        return  # no rows: "no usable pair" says so
    for field, (column, key) in named.items():
        if column in present:
            continue
        close = difflib.get_close_matches(column, list(present), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        every = (" (data.columns applies to every source; a source's own `columns:` maps "
                 "only that one)") if key.startswith("data.") else ""
        raise DataError(f"Column '{column}' ({key}.{field}) is not in "
                        f"{source or 'the data'}{every}. Its columns: "
                        f"{', '.join(present)}.{hint}")


def _record_origins(r: _Row, c: _Context) -> None:
    """Which column (or rule) fed each part of this pair, for the report."""
    side = r.pair_from or None
    for part, how in (("prompt", r.prompt_from),
                      ("chosen", side or f"column '{c.cols['chosen']}'"),
                      ("rejected", side or f"column '{c.cols['rejected']}'"),
                      ("system", r.system is not None and f"column '{c.cols['system']}'"),
                      ("weight", r.row.get(c.cols["weight"]) is not None
                       and f"column '{c.cols['weight']}'")):
        if how:
            c.report.origins[(part, how)] += 1


def normalise_rows(rows: list[Any], settings: DataConfig, report: DataReport, *, seed: int,
                   source: str = "", columns: dict[str, str] | None = None) -> list[Pair]:
    """Pairs of the usable rows; every other row is counted in `report` with its reason (or,
    with data.strict, stops everything). `seed` draws the rejected response for
    data.pair_selection best_vs_random; `columns` is one source's own mapping. A column
    either mapping names must be in the data."""
    named = {**{k: (v, "data.columns") for k, v in settings.columns.items()},
             **{k: (v, "the source's columns") for k, v in (columns or {}).items()}}
    check_named_columns(rows, named, source)
    cols = {**_DEFAULT_COLUMNS, **{k: v for k, (v, _) in named.items()}}
    ctx = _Context(cols, "prompt" in named, settings.format, settings.pair_selection,
                   random.Random(seed), report)
    pairs = []
    for i, row in enumerate(rows):
        report.rows += 1
        where = f"{source} row {i + 1}" if source else f"row {i + 1}"
        if isinstance(row, BadLine):  # a line the reader could not split into a row
            report.skip(row.reason, f"{where}, line {row.line}")
            continue
        r = _normalise_row(row, ctx)
        if isinstance(r, str):
            report.skip(r, where)
            continue
        _record_origins(r, ctx)
        pairs.append(Pair(r.prompt, r.chosen, r.rejected, r.weight, i + 1, source, r.system))
    return pairs
