"""Micro-batches and their layout: which tokens go where, and which positions are scored.

A `PackedBatch` says everything logps.py needs and nothing about the loss: the rows fed to the
model, their positions and attention, and for every completion token the flat index of the
hidden state that predicts it and the sequence (pair, side) it belongs to. Layouts differ only
in how rows are built; the scoring is identical, which is what makes them interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from qdpo.data import PairTokens

LAYOUTS = ("padded",)


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [R, T]
    position_ids: torch.Tensor  # [R, T]
    attention_mask: torch.Tensor  # [R, T] (1 = real token) or [R, 1, T, T] bool
    pred_index: torch.Tensor  # [N] flat index into R*T of the predicting position
    targets: torch.Tensor  # [N] the token predicted there
    seq_index: torch.Tensor  # [N] 0..2P-1: chosen of pair i is i, rejected is P + i
    token_offset: torch.Tensor  # [N] position of the token within its completion
    num_pairs: int
    chosen_lengths: torch.Tensor  # [P]
    rejected_lengths: torch.Tensor  # [P]
    weights: torch.Tensor  # [P]
    pair_ids: list[int]  # indices into the data set (reference cache keys)
    num_tokens: int  # prompt+chosen + prompt+rejected, the field's count
    layout: str

    def to(self, device: torch.device) -> "PackedBatch":
        for name in ("input_ids", "position_ids", "attention_mask", "pred_index", "targets",
                     "seq_index", "token_offset", "chosen_lengths", "rejected_lengths",
                     "weights"):
            setattr(self, name, getattr(self, name).to(device, non_blocking=True))
        return self

    @property
    def slots(self) -> int:
        return self.input_ids.numel()


def _scoring(rows: list[list[int]], spans: list[tuple[int, int, int, int]], width: int,
             num_pairs: int) -> tuple[torch.Tensor, ...]:
    """Index tensors for spans (row, start, length, seq): token j is predicted at j - 1."""
    pred, tgt, seq, off = [], [], [], []
    for row, start, length, s in spans:
        ids = rows[row]
        base = row * width
        pred.extend(range(base + start - 1, base + start + length - 1))
        tgt.extend(ids[start:start + length])
        seq.extend([s] * length)
        off.extend(range(length))
    return (torch.tensor(pred, dtype=torch.long), torch.tensor(tgt, dtype=torch.long),
            torch.tensor(seq, dtype=torch.long), torch.tensor(off, dtype=torch.long))


def padded_batch(pairs: Sequence[PairTokens], pair_ids: Sequence[int], pad_id: int) -> PackedBatch:
    """Chosen rows then rejected rows, right-padded: the reference layout for the others."""
    p = len(pairs)
    rows = [x.prompt_ids + x.chosen_ids for x in pairs] + \
        [x.prompt_ids + x.rejected_ids for x in pairs]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    spans = []
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
        pair = pairs[i % p]
        comp = pair.chosen_ids if i < p else pair.rejected_ids
        spans.append((i, len(pair.prompt_ids), len(comp), i))
    pred, tgt, seq, off = _scoring(rows, spans, width, p)
    positions = torch.arange(width, dtype=torch.long).expand(len(rows), width).clone()
    return PackedBatch(
        input_ids=ids, position_ids=positions, attention_mask=mask, pred_index=pred,
        targets=tgt, seq_index=seq, token_offset=off, num_pairs=p,
        chosen_lengths=torch.tensor([len(x.chosen_ids) for x in pairs], dtype=torch.long),
        rejected_lengths=torch.tensor([len(x.rejected_ids) for x in pairs], dtype=torch.long),
        weights=torch.tensor([x.weight for x in pairs], dtype=torch.float32),
        pair_ids=list(pair_ids), num_tokens=sum(x.num_tokens for x in pairs), layout="padded")


def make_batch(pairs: Sequence[PairTokens], pair_ids: Sequence[int], pad_id: int,
               layout: str = "padded") -> PackedBatch:
    if layout == "padded":
        return padded_batch(pairs, pair_ids, pad_id)
    raise ValueError(f"unknown layout {layout!r}")


def micro_batches(order: Sequence[int], data: Sequence[PairTokens], pairs_per_micro: int,
                  pad_id: int, layout: str = "padded") -> Iterator[PackedBatch]:
    """Split one optimizer step's pairs into micro-batches, grouping similar lengths."""
    idx = sorted(order, key=lambda i: data[i].num_tokens)
    for s in range(0, len(idx), pairs_per_micro):
        chunk = idx[s:s + pairs_per_micro]
        yield make_batch([data[i] for i in chunk], chunk, pad_id, layout)
