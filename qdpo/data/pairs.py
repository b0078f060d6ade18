"""What the data rooms hand each other: a normalised pair of texts, and its token ids.

A leaf module (dataclasses and typing only), so that batching, the reference cache and the
benchmarks can name `PairTokens` without importing how data is read, normalised or tokenized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qdpo.data.encode import Tokenizer
    from qdpo.data.report import DataReport


@dataclass
class BadLine:
    """A line of a file that the reader could not turn into a row (a CSV line with more fields
    than its header, a JSONL line that is not JSON): it stands in the rows where the line was,
    so that normalising counts it as a skip with its reason, like any bad row, instead of
    ending the whole file."""

    reason: str
    line: int


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
    """A normalised row: the prompt (text, or the messages before the reply) and one assistant
    reply per side. `system` is the row's own system message (a mapped `system` column); it
    goes before the prompt when encoded, like data.system_prompt, and wins over it."""

    prompt: list[dict[str, str]] | str
    chosen: str
    rejected: str
    weight: float = 1.0
    row: int = 0
    source: str = ""
    system: str | None = None


@dataclass
class PreparedData:
    train: list[PairTokens]
    eval: list[PairTokens]
    train_report: DataReport
    eval_report: DataReport | None
    tokenizer: Tokenizer
