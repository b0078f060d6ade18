"""Preference data: read rows, normalise them to (prompt, chosen, rejected), tokenize.

Whatever the source looks like, what leaves this module is a list of `PairTokens` whose
`prompt_ids` are exactly the prefix of both training sequences (the completion is tokenized on
its own and appended, so no BPE merge can cross the boundary) and whose completions end with the
end-of-turn token the chat format expects. Nothing here knows about the model.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import multiprocessing
import os
import random
import re
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qdpo.cache import cache_dir
from qdpo.files import write_atomically
from qdpo.errors import DataError
from qdpo.recipe import DataSource, Recipe

# ---------------------------------------------------------------------------------------
# Built-in chat templates, for tokenizers that have none (base models) or on request.
# ---------------------------------------------------------------------------------------

CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
        "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] "
        "+ '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{% endif %}"
    ),
    "zephyr": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + "
        "eos_token + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
        "{% endif %}"
    ),
}

ROLES = ("system", "user", "assistant", "tool")
# Holds what templates like to transform (quotes, backslash, newline, &, <, non-ASCII,
# braces, edge spaces): if it does not come back verbatim, the shortcut is off for that pair.
_SENTINEL = "\u2063 qdpo \"reply\" \\ & <é>\n{{x}} \u2063"


@dataclass
class PairTokens:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    weight: float = 1.0

    @property
    def num_tokens(self) -> int:
        """Real tokens as the field counts them: prompt+chosen plus prompt+rejected."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class Pair:
    """A normalised row: a message list for the prompt, one assistant reply per side."""

    prompt: list[dict[str, str]] | str
    chosen: str
    rejected: str
    weight: float = 1.0
    row: int = 0
    source: str = ""


@dataclass
class DataReport:
    rows: int = 0
    pairs: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    prompt_truncated: int = 0
    response_truncated: int = 0
    dropped_too_long: int = 0
    formats: Counter = field(default_factory=Counter)
    mixed: dict[str, int] = field(default_factory=dict)
    strict: bool = False
    cached: bool = False

    def merge(self, other: "DataReport") -> None:
        """Add a worker's counts (tokenization in parallel processes)."""
        self.skipped.update(other.skipped)
        self.examples.extend(other.examples[: max(0, 5 - len(self.examples))])
        self.prompt_truncated += other.prompt_truncated
        self.response_truncated += other.response_truncated
        self.dropped_too_long += other.dropped_too_long

    def skip(self, reason: str, where: str) -> None:
        if self.strict:
            raise DataError(f"Bad row ({where}): {reason}. Fix the row, or set data.strict: "
                            "false to skip bad rows and count them.")
        self.skipped[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {reason}")

    def summary(self) -> str:
        parts = [f"{self.pairs} pairs from {self.rows} rows"
                 + (" (tokenized earlier, from cache)" if self.cached else "")]
        if self.formats:
            parts.append("format " + ", ".join(f"{k}" for k in self.formats))
        if self.mixed:
            parts.append("mixed " + ", ".join(f"{n} from {k}" for k, n in self.mixed.items()))
        if self.skipped:
            parts.append(f"{sum(self.skipped.values())} skipped ("
                         + ", ".join(f"{n} {r}" for r, n in self.skipped.most_common()) + ")")
        if self.prompt_truncated:
            parts.append(f"{self.prompt_truncated} prompts cut from the left")
        if self.response_truncated:
            parts.append(f"{self.response_truncated} responses cut")
        if self.dropped_too_long:
            parts.append(f"{self.dropped_too_long} dropped (no room for a response)")
        return "; ".join(parts)


# ---------------------------------------------------------------------------------------
# Reading rows
# ---------------------------------------------------------------------------------------

_EXT = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _local_files(path: str) -> list[Path] | None:
    p = Path(path)
    if any(ch in path for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(path))
        if not files:
            raise DataError(f"Data path '{path}' matches no file.")
        return files
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in _EXT)
        if not files:
            raise DataError(f"Data directory '{path}' holds no .jsonl/.json/.parquet/.csv file.")
        return files
    if p.is_file():
        return [p]
    if p.suffix in _EXT or path.startswith((".", "/", "~")):
        raise DataError(f"Data file '{path}' does not exist. Check data.train / eval.data "
                        "(relative paths are looked up next to the recipe, then in the current "
                        "directory).")
    return None


def _read_json_file(f: Path) -> list[dict[str, Any]]:
    text = f.read_text(encoding="utf-8-sig")
    stripped = text.lstrip()
    if f.suffix == ".json" and stripped.startswith(("[", "{")):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if not stripped.startswith("{"):
                raise DataError(f"'{f}' is not valid JSON: {e}.") from None
            obj = None
        if isinstance(obj, list):
            return obj
        if isinstance(obj, dict):
            for v in obj.values():  # {"data": [...]} style
                if isinstance(v, list) and (not v or isinstance(v[0], dict)):
                    return v
            return [obj]
    rows = []
    # split on newlines only: str.splitlines also breaks at U+2028 etc., which JSON strings
    # may hold raw
    for i, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"'{f}' line {i} is not valid JSON ({e.msg}). Fix or remove that "
                            "line.") from None
    return rows


def read_rows(source: DataSource, recipe: Recipe | None = None) -> list[dict[str, Any]]:
    """All rows of one source as plain dicts (local files read directly, hub via datasets)."""
    path = recipe.resolve_path(source.path) if recipe else source.path
    files = _local_files(path)
    rows: list[dict[str, Any]] = []
    if files is not None:
        for f in files:
            kind = _EXT.get(f.suffix)
            if kind is None:
                raise DataError(f"Data file '{f}' has an unknown extension; use .jsonl, .json, "
                                ".parquet or .csv.")
            try:
                if kind == "json":
                    rows.extend(_read_json_file(f))
                else:
                    import datasets

                    if kind == "csv":  # text stays text, even when it looks like a number
                        import pandas as pd

                        rows.extend(pd.read_csv(f, dtype=str, keep_default_na=False)
                                    .to_dict("records"))
                    else:
                        ds = datasets.load_dataset(kind, data_files=str(f), split="train")
                        rows.extend(ds.to_list())
            except DataError:
                raise
            except (OSError, UnicodeDecodeError, ValueError) as e:
                raise DataError(f"Data file '{f}' cannot be read: {e}") from None
            except Exception as e:  # arrow / parser errors come in many types
                raise DataError(f"Data file '{f}' cannot be read as {kind}: "
                                f"{type(e).__name__}: {e}") from None
        return rows
    try:
        import datasets

        ds = datasets.load_dataset(path, source.name, split=source.split,
                                   revision=source.revision)
    except Exception as e:
        raise DataError(
            f"Data source '{source.path}' is neither a local file nor a loadable hub dataset "
            f"(split '{source.split}'{', config ' + source.name if source.name else ''}): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return ds.to_list()


# ---------------------------------------------------------------------------------------
# Normalising rows to Pair
# ---------------------------------------------------------------------------------------

def _is_messages(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(m, dict) for m in v) and len(v) > 0


def _check_messages(msgs: list[dict[str, Any]], name: str) -> str | None:
    for m in msgs:
        if "role" not in m or "content" not in m:
            return f"{name} has a message without role/content"
        if m["role"] not in ROLES:
            return f"{name} has unknown role {m['role']!r}"
        if not isinstance(m["content"], str):
            return f"{name} has non-string message content"
    return None


def _completion_text(v: Any, prompt: Any, name: str) -> tuple[str | None, str | None, Any]:
    """The reply text of one side, plus (for implicit prompts) the prompt it carries."""
    if isinstance(v, str):
        return v, None, None
    if _is_messages(v):
        err = _check_messages(v, name)
        if err:
            return None, err, None
        if v[-1]["role"] != "assistant":
            return None, f"{name} does not end with an assistant message", None
        return v[-1]["content"], None, v[:-1] or None
    if v is None:
        return None, f"missing {name}", None
    return None, f"{name} is a {type(v).__name__}, not text or messages", None


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
_PROMPT_FALLBACKS = ("instruction", "question", "input")
_TEXT_KEYS = ("response", "text", "content", "completion", "output", "answer")
_SCORE_KEYS = ("score", "overall_score", "rating", "reward", "fine-grained_score")


def _hh_messages(text: str) -> list[dict[str, str]] | None:
    """Anthropic HH-RLHF text ("\n\nHuman: ...\n\nAssistant: ...") as messages."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    return [{"role": "user" if r == "Human" else "assistant", "content": c.strip()}
            for r, c in zip(parts[1::2], parts[2::2])]


def _split_shared_text(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """Texts that share a prefix: (prompt, chosen reply, rejected reply), cut at a space."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    while n > 0 and not chosen[n - 1].isspace():
        n -= 1
    if n == 0:
        return None
    return chosen[:n], chosen[n:], rejected[n:]


def _ranked_pair(row: dict[str, Any], cols: dict[str, str], how: str,
                 rng: random.Random) -> tuple[Any, Any] | str:
    """(chosen, rejected) from several scored responses, or the reason there is none."""
    responses = row.get(cols["responses"])
    if not isinstance(responses, list) or len(responses) < 2:
        return "needs chosen/rejected, or at least two scored responses"
    scores = row.get(cols["scores"])
    items: list[tuple[float, Any]] = []
    for k, r in enumerate(responses):
        if isinstance(r, dict):
            text = next((r[t] for t in _TEXT_KEYS if t in r), None)
            score = next((r[t] for t in _SCORE_KEYS if t in r), None)
            if isinstance(score, dict):  # nested ratings: their mean
                vals = [v for v in score.values() if isinstance(v, (int, float))]
                score = sum(vals) / len(vals) if vals else None
        else:
            text = r
            score = scores[k] if isinstance(scores, list) and k < len(scores) else None
        try:
            value = float(score)  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):
            value = math.nan
        if not math.isfinite(value):
            return f"response {k + 1} has no numeric score"
        items.append((value, text))
    items.sort(key=lambda x: -x[0])
    best = items[0]
    worse = [x for x in items[1:] if x[0] < best[0]]
    if not worse:
        return "all responses have the same score"
    if how == "best_vs_random":
        rejected = rng.choice(worse)
    elif how == "best_vs_second":
        rejected = worse[0]
    else:
        rejected = worse[-1]
    return best[1], rejected[1]


def normalise_rows(rows: list[dict[str, Any]], recipe: Recipe, report: DataReport,
                   source: str = "", columns: dict[str, str] | None = None) -> list[Pair]:
    cols = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "weight": "weight",
            "responses": "completions", "scores": "scores"}
    cols.update(recipe.data.columns)
    cols.update(columns or {})
    prompt_mapped = "prompt" in recipe.data.columns or "prompt" in (columns or {})
    fmt = recipe.data.format
    rng = random.Random(recipe.train.seed)
    pairs = []
    for i, row in enumerate(rows):
        where = f"{source} row {i + 1}" if source else f"row {i + 1}"
        report.rows += 1
        if not isinstance(row, dict):
            report.skip("row is not an object", where)
            continue
        if not prompt_mapped and cols["prompt"] not in row:
            alt = next((c for c in _PROMPT_FALLBACKS if c in row), None)
            if alt is not None and (cols["chosen"] not in row or cols["rejected"] not in row
                                    or isinstance(row.get(cols["chosen"]), str)):
                row = dict(row, **{cols["prompt"]: row[alt]})
        if (cols["chosen"] not in row or cols["rejected"] not in row) and (
                cols["responses"] in row or "responses" in row):
            if cols["responses"] not in row:
                row = dict(row, **{cols["responses"]: row["responses"]})
            picked = _ranked_pair(row, cols, recipe.data.pair_selection, rng)
            if isinstance(picked, str):
                report.skip(picked, where)
                continue
            row = dict(row, **{cols["chosen"]: picked[0], cols["rejected"]: picked[1]})
            report.formats["ranked"] += 1
        if cols["chosen"] not in row or cols["rejected"] not in row:
            missing = [c for c in (cols["chosen"], cols["rejected"]) if c not in row]
            report.skip(f"missing column {', '.join(repr(m) for m in missing)} (columns: "
                        f"{', '.join(map(str, row))}; map yours with data.columns)", where)
            continue
        prompt = row.get(cols["prompt"])
        c_raw, r_raw = row[cols["chosen"]], row[cols["rejected"]]
        if prompt is None and isinstance(c_raw, str) and isinstance(r_raw, str):
            # implicit prompt in text: HH-RLHF dialogues, or texts sharing a prefix
            hc, hr = _hh_messages(c_raw), _hh_messages(r_raw)
            if hc and hr and fmt != "standard":
                c_raw, r_raw = hc, hr
                report.formats["implicit (HH dialogue)"] += 1
            else:
                split = _split_shared_text(c_raw, r_raw)
                if split is None:
                    report.skip("missing prompt (and chosen/rejected share no prefix)", where)
                    continue
                prompt, c_raw, r_raw = split
                report.formats["implicit (shared text prefix)"] += 1
        chosen, err, c_prefix = _completion_text(c_raw, prompt, "chosen")
        if err:
            report.skip(err, where)
            continue
        rejected, err, r_prefix = _completion_text(r_raw, prompt, "rejected")
        if err:
            report.skip(err, where)
            continue
        if prompt is not None and c_prefix is not None and r_prefix is not None \
                and c_prefix != r_prefix:
            report.skip("chosen and rejected carry different conversations", where)
            continue
        if prompt is None or (isinstance(prompt, str) and not prompt and c_prefix):
            # implicit prompt: both sides carry the conversation before the reply
            if c_prefix is None or c_prefix != r_prefix:
                report.skip("missing prompt (and chosen/rejected do not share a conversation "
                            "prefix)", where)
                continue
            prompt = c_prefix
        if isinstance(prompt, str) and c_prefix is not None and c_prefix == r_prefix \
                and fmt != "standard":
            # e.g. UltraFeedback: a prompt string beside full conversations; the messages
            # carry the real (possibly multi-turn, system-prompted) context
            prompt = c_prefix
        if _is_messages(prompt):
            err = _check_messages(prompt, "prompt")
            if err:
                report.skip(err, where)
                continue
            if fmt == "standard":
                report.skip("prompt is a message list but data.format is standard", where)
                continue
            if c_prefix is not None and c_prefix != prompt and c_prefix[: len(prompt)] == prompt:
                prompt = c_prefix  # chosen carried the whole conversation
            report.formats["conversational"] += 1
        elif isinstance(prompt, str):
            if fmt == "conversational":
                report.skip("prompt is text but data.format is conversational", where)
                continue
            if not prompt.strip():
                report.skip("empty prompt", where)
                continue
            report.formats["standard"] += 1
        else:
            report.skip(f"prompt is a {type(prompt).__name__}, not text or messages", where)
            continue
        if not chosen.strip() or not rejected.strip():
            report.skip("empty chosen or rejected", where)
            continue
        if chosen == rejected:
            report.skip("chosen identical to rejected", where)
            continue
        weight = 1.0
        if cols["weight"] in row and row[cols["weight"]] is not None:
            try:
                weight = float(row[cols["weight"]])
            except (TypeError, ValueError, OverflowError):
                weight = math.nan
            if not math.isfinite(weight) or weight < 0:
                report.skip("weight is not a finite number >= 0", where)
                continue
        sys_col = cols.get("system")
        sys_text = row.get(sys_col) if sys_col else None
        if isinstance(sys_text, str) and sys_text.strip():  # a per-row system prompt column
            msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            if msgs[0]["role"] != "system":
                prompt = [{"role": "system", "content": sys_text}] + list(msgs)
        texts = [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt]
        try:
            for t in texts + [chosen, rejected]:
                t.encode("utf-8")
        except UnicodeEncodeError:
            report.skip("text is not valid Unicode (a lone surrogate, e.g. a cut emoji)", where)
            continue
        pairs.append(Pair(prompt, chosen, rejected, weight, i + 1, source))
    return pairs


# ---------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------

def resolve_chat_template(tokenizer: Any, setting: str, need: bool) -> str | None:
    """The Jinja template to use, or None for plain text."""
    if setting == "none":
        if need:
            raise DataError("The data is conversational but data.chat_template is 'none'. Set it "
                            "to 'auto', 'chatml', 'llama3', 'zephyr' or a Jinja template.")
        return None
    if setting == "auto":
        tpl = getattr(tokenizer, "chat_template", None)
        if tpl:
            return tpl
        if need:
            raise DataError("The data is conversational but the tokenizer has no chat template. "
                            "Set data.chat_template to 'chatml', 'llama3', 'zephyr' or a Jinja "
                            "template string.")
        return None
    return CHAT_TEMPLATES.get(setting, setting)


def _strip_after_eos(text: str, eos: str | None) -> str:
    if eos and text.rstrip("\n") .endswith(eos):
        return text.rstrip("\n")
    return text


class Tokenizer:
    """Turns `Pair`s into `PairTokens` with the prefix and EOS guarantees."""

    def __init__(self, tokenizer: Any, recipe: Recipe, conversational: bool):
        self.tok = tokenizer
        self.recipe = recipe
        self.conversational = conversational
        self.system_prompt = recipe.data.system_prompt  # chat's /system changes it
        self.template = resolve_chat_template(tokenizer, recipe.data.chat_template,
                                              conversational)
        self.eos = tokenizer.eos_token
        if self.eos is None:
            raise DataError("The tokenizer has no EOS token; qdpo needs one to end responses.")
        self._shortcut = True
        self._checks_left = 32
        self._compiled = None
        self._template_vars: dict[str, Any] = {}
        if self.template is not None:
            try:  # transformers' own compiled template, rendered without its per-call overhead
                from transformers.utils.chat_template_utils import _compile_jinja_template

                self._compiled = _compile_jinja_template(self.template)
                self._template_vars = dict(getattr(tokenizer, "special_tokens_map", {}))
                probe = [{"role": "user", "content": "hi"}]
                if self._render(probe, True) != tokenizer.apply_chat_template(
                        probe, chat_template=self.template, tokenize=False,
                        add_generation_prompt=True):
                    self._compiled = None
            except Exception:
                self._compiled = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._fast_encode = getattr(backend, "encode_batch_fast", None)

    def encode(self, texts: list[str], special: bool) -> list[list[int]]:
        """Token ids of many texts (the Rust tokenizer directly when there is one)."""
        if self._fast_encode is not None:
            return [e.ids for e in self._fast_encode(texts, add_special_tokens=special)]
        return self.tok(texts, add_special_tokens=special)["input_ids"]

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        if self._compiled is not None:
            try:
                return self._compiled.render(messages=messages,
                                             add_generation_prompt=generation_prompt,
                                             **self._template_vars)
            except Exception:
                self._compiled = None  # the template needs transformers' full context
        return self.tok.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                            add_generation_prompt=generation_prompt)

    def prompt_messages(self, prompt: list[dict[str, str]] | str) -> list[dict[str, str]]:
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if self.system_prompt and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": self.system_prompt}] + msgs
        return msgs

    def _completion(self, msgs: list[dict[str, str]], prompt_text: str, reply: str) -> str:
        full = self._render(msgs + [{"role": "assistant", "content": reply}], False)
        if full.startswith(prompt_text):
            completion = full[len(prompt_text):]
        else:  # templates that rewrite earlier turns: fall back to the reply itself
            completion = reply
        completion = _strip_after_eos(completion, self.eos)
        return completion if completion.endswith(self.eos) else completion + self.eos

    def texts(self, pair: Pair) -> tuple[str, str, str, bool]:
        """(prompt text, chosen text, rejected text, prompt_has_special_tokens).

        The reply's chat wrapping (e.g. "...<|im_end|>") is found once per pair by rendering a
        sentinel reply and substituting both replies into it: one template render per pair
        instead of two. Replies a template might transform (surrounding whitespace, tags)
        take the exact path, and the first pairs are checked against it; any difference turns
        the shortcut off for the whole data set.
        """
        if self.template is None:
            prompt = pair.prompt if isinstance(pair.prompt, str) else ""
            return prompt, pair.chosen + self.eos, pair.rejected + self.eos, False
        msgs = self.prompt_messages(pair.prompt)
        prompt_text = self._render(msgs, True)
        wrap = self._wrapper(msgs, prompt_text) if self._shortcut else None
        out = []
        for reply in (pair.chosen, pair.rejected):
            if wrap is not None and reply == reply.strip() and "<" not in reply:
                fast = _strip_after_eos(wrap[0] + reply + wrap[1], self.eos)
                fast = fast if fast.endswith(self.eos) else fast + self.eos
                if self._checks_left > 0:
                    self._checks_left -= 1
                    if fast != self._completion(msgs, prompt_text, reply):
                        self._shortcut = False
                        fast = self._completion(msgs, prompt_text, reply)
                out.append(fast)
            else:
                out.append(self._completion(msgs, prompt_text, reply))
        return prompt_text, out[0], out[1], True

    def _wrapper(self, msgs: list[dict[str, str]], prompt_text: str) -> tuple[str, str] | None:
        full = self._render(msgs + [{"role": "assistant", "content": _SENTINEL}], False)
        if not full.startswith(prompt_text) or full.count(_SENTINEL) != 1:
            return None
        pre, post = full[len(prompt_text):].split(_SENTINEL)
        return pre, post

    def render_prompt(self, prompt: list[dict[str, str]] | str) -> str:
        """The text a generation for this prompt starts from (chat and generate use it)."""
        if self.template is None:
            if isinstance(prompt, str):
                return prompt
            return "\n".join(m["content"] for m in prompt if m["role"] != "system")
        return self._render(self.prompt_messages(prompt), True)

    def encode_prompt(self, text: str, templated: bool) -> list[int]:
        return self.tok(text, add_special_tokens=not templated)["input_ids"]

    def tokenize_chunk(self, pairs: list[Pair], report: DataReport) -> list[PairTokens]:
        max_len, max_prompt = self.recipe.data.max_length, self.recipe.data.max_prompt_length
        texts = [self.texts(p) for p in pairs]
        if not texts:
            return []
        templated = texts[0][3]
        prompts = self.encode([t[0] for t in texts], not templated)
        chosen = self.encode([t[1] for t in texts], False)
        rejected = self.encode([t[2] for t in texts], False)
        out = []
        for pair, p, c, r in zip(pairs, prompts, chosen, rejected):
            if len(p) > max_prompt:
                p = p[-max_prompt:]
                report.prompt_truncated += 1
            room = max_len - len(p)
            if room < 1:
                report.dropped_too_long += 1
                continue
            if len(c) > room or len(r) > room:
                report.response_truncated += (len(c) > room) + (len(r) > room)
                c, r = c[:room], r[:room]
            if not c or not r:
                report.skip("empty response after tokenization", f"row {pair.row}")
                continue
            out.append(PairTokens(list(p), list(c), list(r), pair.weight))
        return out

    def __call__(self, pairs: list[Pair], report: DataReport,
                 progress: Any = None) -> list[PairTokens]:
        """Tokenize in chunks; large data sets in parallel processes (fork)."""
        chunks = [pairs[s:s + TOKENIZE_CHUNK] for s in range(0, len(pairs), TOKENIZE_CHUNK)]
        procs = self.recipe.data.num_proc or min(os.cpu_count() or 1, 8)
        out: list[PairTokens] = []
        if procs > 1 and len(pairs) >= PARALLEL_MIN_PAIRS and \
                "fork" in multiprocessing.get_all_start_methods():
            global _WORKER
            _WORKER = self
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            ctx = multiprocessing.get_context("fork")
            with ctx.Pool(min(procs, len(chunks))) as pool:
                for part, rep in pool.imap(_tokenize_worker, chunks):
                    out.extend(part)
                    report.merge(rep)
                    if progress:
                        progress(TOKENIZE_CHUNK)
            _WORKER = None
        else:
            for chunk in chunks:
                out.extend(self.tokenize_chunk(chunk, report))
                if progress:
                    progress(len(chunk))
        report.pairs += len(out)
        return out


TOKENIZE_CHUNK = 500
PARALLEL_MIN_PAIRS = 4000
_WORKER: Tokenizer | None = None


def _tokenize_worker(chunk: list[Pair]) -> tuple[list[PairTokens], DataReport]:
    rep = DataReport(strict=_WORKER.recipe.data.strict)  # type: ignore[union-attr]
    return _WORKER.tokenize_chunk(chunk, rep), rep  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------
# The whole step, as the trainer and `qdpo data` call it
# ---------------------------------------------------------------------------------------

@dataclass
class PreparedData:
    train: list[PairTokens]
    eval: list[PairTokens]
    train_report: DataReport
    eval_report: DataReport | None
    tokenizer: Tokenizer


def _load_pairs(sources: list[DataSource], recipe: Recipe, report: DataReport) -> list[Pair]:
    """All sources' pairs, each scaled by its weight or cut to its sample count."""
    pairs: list[Pair] = []
    names = [Path(s.path).name for s in sources]
    for k, s in enumerate(sources):
        rows = read_rows(s, recipe)
        name = names[k] if names.count(names[k]) == 1 else s.path  # keep namesakes apart
        got = normalise_rows(rows, recipe, report, source=name, columns=s.columns)
        want = s.samples if s.samples is not None else round(len(got) * s.weight)
        if got and want != len(got):
            rng = random.Random(recipe.train.seed * 7919 + k)
            if want <= len(got):
                got = rng.sample(got, want)
            else:  # upsample: every pair as often as fits, the rest drawn at random
                reps, rest = divmod(want, len(got))
                got = got * reps + rng.sample(got, rest)
            report.mixed[name] = len(got)
        pairs.extend(got)
    return pairs


def _nothing_left(report: DataReport, what: str) -> DataError:
    why = "; ".join(report.examples[:3]) or "the sources hold no rows"
    return DataError(f"No usable {what} pair in the data ({report.rows} rows read). First "
                     f"problems: {why}.")


DATA_CACHE_VERSION = 1


def data_fingerprint(recipe: Recipe, tokenizer: Any) -> str:
    """Everything the tokenized pairs depend on: sources (file sizes and times, or hub ids),
    data settings, seed, and the tokenizer with its chat template."""
    h = hashlib.sha256()
    settings = {"v": DATA_CACHE_VERSION, "data": dataclasses.asdict(recipe.data),
                "eval": dataclasses.asdict(recipe.eval), "seed": recipe.train.seed}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for src in recipe.data.train + recipe.eval.data:
        path = recipe.resolve_path(src.path)
        files = _local_files(path)
        if files is None:
            h.update(f"hub:{path}:{src.split}:{src.name}:{src.revision}".encode())
            continue
        for f in files:
            st = f.stat()
            h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    h.update(f"{tokenizer.eos_token}|{tokenizer.bos_token}".encode())
    return h.hexdigest()[:24]


def _cache_file(key: str) -> Path:
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


_COUNTERS = ("skipped", "formats")


def _report_to_dict(r: DataReport | None) -> dict[str, Any] | None:
    if r is None:
        return None
    d = dataclasses.asdict(r)
    for k in _COUNTERS:  # keys may be tuples: keep them as [key, count] pairs
        d[k] = [[list(key) if isinstance(key, tuple) else key, n] for key, n in d[k].items()]
    return d


def _report_from_dict(d: dict[str, Any] | None) -> DataReport | None:
    if d is None:
        return None
    d = dict(d)
    for k in _COUNTERS:
        d[k] = Counter({tuple(key) if isinstance(key, list) else key: n for key, n in d[k]})
    return DataReport(**d)


def _write_cache(path: Path, data: PreparedData) -> None:
    """Tokenized pairs in safetensors (numbers only) and the reports as json metadata: a
    format that cannot run code when read, unlike pickle."""
    from safetensors.numpy import save_file

    arrays = {**_pairs_to_arrays(data.train, "train"), **_pairs_to_arrays(data.eval, "eval")}
    meta = {"reports": json.dumps({"train": _report_to_dict(data.train_report),
                                   "eval": _report_to_dict(data.eval_report),
                                   "conversational": data.tokenizer.conversational})}
    with write_atomically(path) as tmp:
        save_file(arrays, str(tmp), metadata=meta)


def _read_cache(path: Path, recipe: Recipe, tokenizer: Any) -> PreparedData:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads(f.metadata()["reports"])
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    report = _report_from_dict(meta["train"])
    report.cached = True
    return PreparedData(_pairs_from_arrays(arrays, "train"), _pairs_from_arrays(arrays, "eval"),
                        report, _report_from_dict(meta["eval"]),
                        Tokenizer(tokenizer, recipe, meta["conversational"]))


def prepare(recipe: Recipe, tokenizer: Any, use_cache: bool = True,
            progress: Any = None) -> PreparedData:
    """Read, normalise and tokenize train and eval data, or reuse the cached result."""
    key = data_fingerprint(recipe, tokenizer) if use_cache else None
    if key is not None and _cache_file(key).exists():
        try:
            return _read_cache(_cache_file(key), recipe, tokenizer)
        except Exception:  # a damaged cache is rebuilt, never trusted
            pass
    data = _prepare(recipe, tokenizer, progress)
    if key is not None:
        _write_cache(_cache_file(key), data)
    return data


def _prepare(recipe: Recipe, tokenizer: Any, progress: Any = None) -> PreparedData:
    report = DataReport(strict=recipe.data.strict)
    pairs = _load_pairs(recipe.data.train, recipe, report)
    if not pairs:
        raise _nothing_left(report, "training")
    rng = random.Random(recipe.train.seed)
    rng.shuffle(pairs)
    eval_pairs: list[Pair] = []
    eval_report = None
    if recipe.eval.data:
        eval_report = DataReport(strict=recipe.data.strict)
        eval_pairs = _load_pairs(recipe.eval.data, recipe, eval_report)
        if not eval_pairs:
            raise _nothing_left(eval_report, "eval")
    elif recipe.eval.split_fraction > 0:
        n = max(1, int(len(pairs) * recipe.eval.split_fraction))
        if n >= len(pairs):
            raise DataError(f"eval.split_fraction={recipe.eval.split_fraction} leaves no "
                            f"training pair out of {len(pairs)}.")
        eval_pairs, pairs = pairs[:n], pairs[n:]
        eval_report = DataReport(rows=n)
    if recipe.data.max_pairs:
        pairs = pairs[: recipe.data.max_pairs]
    if recipe.eval.max_pairs:
        eval_pairs = eval_pairs[: recipe.eval.max_pairs]
    conversational = any(not isinstance(p.prompt, str) for p in pairs + eval_pairs)
    tok = Tokenizer(tokenizer, recipe, conversational)
    train = tok(pairs, report, progress)
    if not train:
        raise _nothing_left(report, "training")
    ev = tok(eval_pairs, eval_report, progress) if eval_pairs and eval_report is not None \
        else []
    return PreparedData(train, ev, report, eval_report, tok)


def prepare_sources(sources: list[DataSource], recipe: Recipe, tokenizer: Any,
                    what: str = "eval") -> tuple[list[PairTokens], DataReport]:
    """Tokenized pairs of some sources with the recipe's data settings (qdpo eval)."""
    report = DataReport(strict=recipe.data.strict)
    pairs = _load_pairs(sources, recipe, report)
    if not pairs:
        raise _nothing_left(report, what)
    tok = Tokenizer(tokenizer, recipe, any(not isinstance(p.prompt, str) for p in pairs))
    out = tok(pairs, report)
    if not out:
        raise _nothing_left(report, what)
    return out, report


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
