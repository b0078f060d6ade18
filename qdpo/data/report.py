"""What happened to the rows: counts of pairs, skips (with the first few reasons), truncation,
formats seen, source mixing, and notes a user should read once."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from qdpo.errors import DataError


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
    notes: list[str] = field(default_factory=list)

    def merge(self, other: DataReport) -> None:
        """Add a worker's counts (tokenization in parallel processes)."""
        self.skipped.update(other.skipped)
        self.examples.extend(other.examples[: max(0, 5 - len(self.examples))])
        self.prompt_truncated += other.prompt_truncated
        self.response_truncated += other.response_truncated
        self.dropped_too_long += other.dropped_too_long
        for text in other.notes:
            self.note(text)

    def skip(self, reason: str, where: str) -> None:
        if self.strict:
            raise DataError(f"Bad row ({where}): {reason}. Fix the row, or set data.strict: "
                            "false to skip bad rows and count them.")
        self.skipped[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {reason}")

    def note(self, text: str) -> None:
        """Something the user should know about the whole set, said once."""
        if text not in self.notes:
            self.notes.append(text)

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
        parts.extend(self.notes)
        return "; ".join(parts)
