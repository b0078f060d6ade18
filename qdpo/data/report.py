"""What happened to the rows: counts of pairs, skips (with the first few reasons), truncation,
formats seen, source mixing, which column fed each part of the pairs, eval pairs that are also
training pairs, and notes a user should read once."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from qdpo.console import plural
from qdpo.errors import DataError


CUT_EXAMPLES = 3
PARTS = (("prompt", "prompts"), ("chosen", "chosen"), ("rejected", "rejected"),
         ("system", "system"), ("weight", "weights"))


@dataclass
class DataReport:
    rows: int = 0
    pairs: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    prompt_truncated: int = 0
    prompt_head_lost: int = 0  # of those, cut from the start: the head was over half the room
    response_truncated: int = 0
    dropped_too_long: int = 0
    formats: Counter = field(default_factory=Counter)
    mixed: dict[str, int] = field(default_factory=dict)
    strict: bool = False
    cached: bool = False
    notes: list[str] = field(default_factory=list)
    # (part, where it came from) -> rows: ("prompt", "column 'question'"), ("system", ...)
    origins: Counter = field(default_factory=Counter)
    eval_overlap: int = 0  # eval pairs that are also training pairs
    eval_pairs: int = 0
    # the first few cut pairs, for `qdpo data` to show where: {"row", "prompt_ids" (after the
    # cut), "head" (tokens kept before the cut), "removed", "chosen_cut", "rejected_cut"}
    cuts: list[dict] = field(default_factory=list)

    def record_cut(self, row: int | None, prompt_ids: list[int], head: int, removed: int,
                   chosen_cut: int, rejected_cut: int, head_kept: bool = True) -> None:
        if len(self.cuts) < CUT_EXAMPLES:
            self.cuts.append({"row": row, "prompt_ids": list(prompt_ids), "head": head,
                              "removed": removed, "chosen_cut": chosen_cut,
                              "rejected_cut": rejected_cut, "head_kept": head_kept})

    def merge(self, other: DataReport) -> None:
        """Add a worker's counts (tokenization in parallel processes)."""
        self.skipped.update(other.skipped)
        self.examples.extend(other.examples[: max(0, 5 - len(self.examples))])
        self.prompt_truncated += other.prompt_truncated
        self.prompt_head_lost += other.prompt_head_lost
        self.response_truncated += other.response_truncated
        self.dropped_too_long += other.dropped_too_long
        self.cuts.extend(other.cuts[: max(0, CUT_EXAMPLES - len(self.cuts))])
        for text in other.notes:
            self.note(text)

    def skip(self, reason: str, where: str) -> None:
        if self.strict:
            raise DataError(f"Bad row ({where}): {reason}. Fix the row, or set data.strict: "
                            "false to skip bad rows and count them.")
        self.skipped[reason] += 1
        if len(self.examples) < 5 and self.skipped[reason] == 1:  # one example per problem
            self.examples.append(f"{where}: {reason}")

    def example_lines(self) -> list[str]:
        """Each problem once: its first row, and how many more rows have it."""
        lines = []
        for ex in self.examples:
            reason = ex.split(": ", 1)[-1]
            more = self.skipped.get(reason, 1) - 1
            lines.append(ex + (f" (and {more} more row{'s' if more != 1 else ''} like it)"
                               if more > 0 else ""))
        return lines

    def note(self, text: str) -> None:
        """Something the user should know about the whole set, said once."""
        if text not in self.notes:
            self.notes.append(text)

    def origins_summary(self) -> list[str]:
        """"prompts: column 'prompt'", "chosen: column 'good'", ...: where each part of the
        pairs came from, with row counts where it was not the same for every pair."""
        total = sum(n for (part, _), n in self.origins.items() if part == "prompt")
        out = []
        for part, label in PARTS:
            hows = [(how, n) for (p, how), n in self.origins.most_common() if p == part]
            if len(hows) == 1 and hows[0][1] == total:
                out.append(f"{label}: {hows[0][0]}")
            elif hows:
                out.append(f"{label}: " + ", ".join(
                    f"{how} ({n} row{'s' if n != 1 else ''})" for how, n in hows))
        return out

    def overlap_note(self) -> str | None:
        if not self.eval_overlap:
            return None
        return (f"{self.eval_overlap} of {self.eval_pairs} eval pairs are also training pairs "
                "(same prompt and responses): eval metrics overstate how well the model "
                "generalises")

    def summary(self) -> str:
        parts = [f"{plural(self.pairs, 'pair')} from {plural(self.rows, 'row')}"
                 + (" (tokenized earlier, from cache)" if self.cached else "")]
        if self.formats:
            parts.append("format " + ", ".join(f"{k}" for k in self.formats))
        if self.mixed:
            parts.append("mixed " + ", ".join(f"{n} from {k}" for k, n in self.mixed.items()))
        if self.skipped:
            parts.append(f"{sum(self.skipped.values())} skipped ("
                         + ", ".join(f"{n} {r}" for r, n in self.skipped.most_common()) + ")")
        kept = self.prompt_truncated - self.prompt_head_lost
        if kept:
            parts.append(f"{kept} prompt{'s' if kept != 1 else ''} cut (the oldest content; "
                         "the template's head kept)")
        if self.prompt_head_lost:
            n = self.prompt_head_lost
            parts.append(f"{n} prompt{'s' if n != 1 else ''} cut from the start, only BOS "
                         "kept: the template's head (system turn, role header) is over half "
                         "of data.max_prompt_length; raise it to keep the head")
        if self.response_truncated:
            n = self.response_truncated
            parts.append(f"{n} response{'s' if n != 1 else ''} cut")
        if self.dropped_too_long:
            parts.append(f"{self.dropped_too_long} dropped (no room for a response)")
        parts.extend(self.origins_summary())
        overlap = self.overlap_note()
        parts.extend(self.notes + ([overlap] if overlap else []))
        return "; ".join(parts)
