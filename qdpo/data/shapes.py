"""Row shapes that hide the prompt or the pair: Anthropic HH dialogue texts, texts that share a
prefix, and several scored responses (UltraFeedback-style) to rank. Each helper answers with
the pieces it found, or the reason the row cannot give them."""

from __future__ import annotations

import math
import random
import re
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
_TEXT_KEYS = ("response", "text", "content", "completion", "output", "answer")
_SCORE_KEYS = ("score", "overall_score", "rating", "reward", "fine-grained_score")


def is_messages(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(m, dict) for m in v) and len(v) > 0


def check_messages(msgs: list[dict[str, Any]], name: str) -> str | None:
    """Why a message list is unusable, or None."""
    for m in msgs:
        if "role" not in m or "content" not in m:
            return f"{name} has a message without role/content"
        if m["role"] not in ROLES:
            return f"{name} has unknown role {m['role']!r}"
        if not isinstance(m["content"], str):
            return f"{name} has non-string message content"
    return None


def completion_text(v: Any, name: str) -> tuple[str | None, str | None, Any]:
    """(reply text, why there is none, the conversation the side carries before its reply)."""
    if isinstance(v, str):
        return v, None, None
    if is_messages(v):
        err = check_messages(v, name)
        if err:
            return None, err, None
        if v[-1]["role"] != "assistant":
            return None, f"{name} does not end with an assistant message", None
        return v[-1]["content"], None, v[:-1] or None
    if v is None:
        return None, f"missing {name}", None
    return None, f"{name} is a {type(v).__name__}, not text or messages", None


def hh_messages(text: str) -> list[dict[str, str]] | None:
    """Anthropic HH-RLHF text ("\n\nHuman: ...\n\nAssistant: ...") as messages."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    return [{"role": "user" if r == "Human" else "assistant", "content": c.strip()}
            for r, c in zip(parts[1::2], parts[2::2])]


def split_shared_text(chosen: str, rejected: str) -> tuple[str, str, str] | None:
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


def _response_score(r: Any, k: int, scores: Any) -> tuple[Any, float]:
    """(text, score) of one response; the score is NaN when it is not a finite number."""
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
    return text, value


def ranked_pair(responses: Any, scores: Any, how: str,
                rng: random.Random) -> tuple[Any, Any] | str:
    """(chosen, rejected) from several scored responses, or the reason there is none."""
    if not isinstance(responses, list) or len(responses) < 2:
        return "needs chosen/rejected, or at least two scored responses"
    items: list[tuple[float, Any]] = []
    for k, r in enumerate(responses):
        text, value = _response_score(r, k, scores)
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
