"""Micro-batches and their layout: which tokens go where, and which positions are scored.

A `PackedBatch` says everything logps.py needs and nothing about the loss: the rows fed to the
model, their positions and attention, and for every completion token the flat index of the
hidden state that predicts it and the sequence (pair, side) it belongs to. Layouts differ only
in how rows are built; the scoring is identical, which is what makes them interchangeable.

Layouts:
- `padded`: chosen rows then rejected rows, right-padded. The fallback and the reference.
- `packed`: every sequence (prompt+chosen, prompt+rejected) back to back in a few rows, each
  attending only to itself: no padding, explicit position_ids restarting per sequence.
- `shared_prefix`: each pair as one segment `[prompt, chosen, rejected]`; the prompt is
  computed once, rejected tokens continue the prompt's positions and may not see the chosen
  tokens. Both sides' first tokens are predicted from the last prompt token.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import torch

from qdpo import attention
from qdpo.attention import CHOSEN, PROMPT, REJECTED
from qdpo.data import PairTokens
from qdpo.errors import ModelError

LAYOUTS = ("padded", "packed", "shared_prefix")


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [R, T]
    position_ids: torch.Tensor  # [R, T]
    segments: torch.Tensor  # [R, T] segment id within the row, -1 = padding
    sides: torch.Tensor  # [R, T] PROMPT / CHOSEN / REJECTED (shared_prefix masks use it)
    pred_index: torch.Tensor  # [N] flat index into R*T of the predicting position
    targets: torch.Tensor  # [N] the token predicted there
    seq_index: torch.Tensor  # [N] 0..2P-1: chosen of pair i is i, rejected is P + i
    token_offset: torch.Tensor  # [N] position of the token within its completion
    num_pairs: int
    chosen_lengths: torch.Tensor  # [P]
    rejected_lengths: torch.Tensor  # [P]
    weights: torch.Tensor  # [P]
    pair_ids: list[int]  # indices into the data set (reference cache keys)
    num_tokens: int  # prompt+chosen + prompt+rejected: the field's count, whatever the layout
    layout: str
    # input_ids as they were in host memory before `to(device)` (pinned for CUDA): a model whose
    # input embedding lives in host memory (model.embeddings_on_host) looks them up there
    # without waiting for the GPU
    host_input_ids: torch.Tensor | None = field(default=None, repr=False)

    _TENSORS = ("input_ids", "position_ids", "segments", "sides", "pred_index", "targets",
                "seq_index", "token_offset", "chosen_lengths", "rejected_lengths", "weights")

    def to(self, device: torch.device) -> "PackedBatch":
        # from pinned memory the copy is asynchronous: the CPU goes on to queue the forward
        pin = torch.device(device).type == "cuda"
        for name in self._TENSORS:
            t = getattr(self, name)
            if t.device.type == "cpu":
                t = t.pin_memory() if pin else t
                if name == "input_ids":
                    self.host_input_ids = t
            setattr(self, name, t.to(device, non_blocking=True))
        return self

    @property
    def slots(self) -> int:
        """Token positions the model computes (real tokens plus padding)."""
        return self.input_ids.numel()

    @property
    def real_slots(self) -> int:
        return int((self.segments >= 0).sum())


# ---------------------------------------------------------------------------------------
# Building rows
# ---------------------------------------------------------------------------------------

class _RowBuilder:
    """Accumulates segments into rows and the scoring index lists."""

    def __init__(self, num_pairs: int):
        self.p = num_pairs
        self.rows: list[dict[str, list[int]]] = []
        self.scored: list[tuple[int, list[int], list[int], int]] = []  # row, preds, tgts, seq

    def new_row(self) -> int:
        self.rows.append({"ids": [], "pos": [], "seg": [], "side": []})
        return len(self.rows) - 1

    def add(self, row: int, ids: list[int], pos: Sequence[int], seg: int, side: int) -> int:
        r = self.rows[row]
        start = len(r["ids"])
        r["ids"].extend(ids)
        r["pos"].extend(pos)
        r["seg"].extend([seg] * len(ids))
        r["side"].extend([side] * len(ids))
        return start

    def score(self, row: int, preds: list[int], targets: list[int], seq: int) -> None:
        self.scored.append((row, preds, targets, seq))

    def build(self, pairs: Sequence[PairTokens], pair_ids: Sequence[int], pad_id: int,
              layout: str, row_multiple: int = 1) -> PackedBatch:
        width = -(-max(len(r["ids"]) for r in self.rows) // row_multiple) * row_multiple
        n = len(self.rows)
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        pos = torch.zeros((n, width), dtype=torch.long)
        seg = torch.full((n, width), -1, dtype=torch.long)
        side = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(self.rows):
            k = len(r["ids"])
            ids[i, :k] = torch.tensor(r["ids"], dtype=torch.long)
            pos[i, :k] = torch.tensor(r["pos"], dtype=torch.long)
            seg[i, :k] = torch.tensor(r["seg"], dtype=torch.long)
            side[i, :k] = torch.tensor(r["side"], dtype=torch.long)
            pos[i, k:] = torch.arange(width - k)  # harmless positions for padding
        pred, tgt, sq, off = [], [], [], []
        for row, preds, targets, s in self.scored:
            pred.extend(row * width + p for p in preds)
            tgt.extend(targets)
            sq.extend([s] * len(targets))
            off.extend(range(len(targets)))
        return PackedBatch(
            input_ids=ids, position_ids=pos, segments=seg, sides=side,
            pred_index=torch.tensor(pred, dtype=torch.long),
            targets=torch.tensor(tgt, dtype=torch.long),
            seq_index=torch.tensor(sq, dtype=torch.long),
            token_offset=torch.tensor(off, dtype=torch.long), num_pairs=len(pairs),
            chosen_lengths=torch.tensor([len(x.chosen_ids) for x in pairs], dtype=torch.long),
            rejected_lengths=torch.tensor([len(x.rejected_ids) for x in pairs],
                                          dtype=torch.long),
            weights=torch.tensor([x.weight for x in pairs], dtype=torch.float32),
            pair_ids=list(pair_ids), num_tokens=sum(x.num_tokens for x in pairs), layout=layout)


def segment_cost(pair: PairTokens, layout: str) -> int:
    """Token positions one pair occupies in a layout (padded: before padding)."""
    p, c, r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
    if layout == "shared_prefix":
        return p + c + r
    return 2 * p + c + r


def _add_sequence(b: _RowBuilder, row: int, prompt: list[int], comp: list[int], seg: int,
                  seq: int) -> None:
    start = b.add(row, prompt + comp, range(len(prompt) + len(comp)), seg, PROMPT)
    first = start + len(prompt)
    b.score(row, list(range(first - 1, first + len(comp) - 1)), comp, seq)


def _add_shared(b: _RowBuilder, row: int, pair: PairTokens, seg: int, i: int) -> None:
    lp, lc = len(pair.prompt_ids), len(pair.chosen_ids)
    start = b.add(row, pair.prompt_ids, range(lp), seg, PROMPT)
    c0 = b.add(row, pair.chosen_ids, range(lp, lp + lc), seg, CHOSEN)
    r0 = b.add(row, pair.rejected_ids, range(lp, lp + len(pair.rejected_ids)), seg, REJECTED)
    last_prompt = start + lp - 1
    b.score(row, [last_prompt] + list(range(c0, c0 + lc - 1)), pair.chosen_ids, i)
    b.score(row, [last_prompt] + list(range(r0, r0 + len(pair.rejected_ids) - 1)),
            pair.rejected_ids, b.p + i)


def _rows_first_fit(costs: list[int], capacity: int) -> list[list[int]]:
    """Assign items (largest first) to rows of at most `capacity` tokens: the fewest rows."""
    rows: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        for r, load in enumerate(loads):
            if load + costs[i] <= capacity:
                rows[r].append(i)
                loads[r] += costs[i]
                break
        else:
            rows.append([i])
            loads.append(costs[i])
    return rows


def _rows_even(costs: list[int], n: int, capacity: int) -> list[list[int]] | None:
    """Items (largest first) each to the least-loaded of `n` rows; None if one overflows."""
    rows: list[list[int]] = [[] for _ in range(n)]
    loads = [0] * n
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        r = loads.index(min(loads))
        if loads[r] + costs[i] > capacity:
            return None
        rows[r].append(i)
        loads[r] += costs[i]
    return rows


def _row_slots(rows: list[list[int]], costs: list[int], multiple: int) -> int:
    """Token positions the rows occupy once padded to the longest (rounded to `multiple`)."""
    longest = max(sum(costs[i] for i in row) for row in rows)
    return len(rows) * -(-longest // multiple) * multiple


def pack_rows(costs: list[int], capacity: int, multiple: int = 1) -> list[list[int]]:
    """Items into rows of at most `capacity` tokens, with the fewest padded positions.

    Every row is padded to the longest, so the fewest rows (first-fit) can still waste a lot:
    three full rows and a short fourth pad the fourth to full length. Spreading the same items
    evenly over as many rows, or one or two more, often needs fewer positions; the cheapest
    of these is taken. On the benchmark's pairs (8B shape, 2048-token rows, 8k-token
    micro-batches) padding fell from 15% to 9% of the positions.
    """
    # a sequence longer than a row makes every row that wide anyway: fill rows to it
    capacity = max(capacity, max(costs))
    best = _rows_first_fit(costs, capacity)
    for n in range(len(best), min(len(best) + 2, len(costs)) + 1):
        rows = _rows_even(costs, n, capacity)
        if rows is not None and _row_slots(rows, costs, multiple) < _row_slots(best, costs,
                                                                                multiple):
            best = rows
    return best


def make_batch(pairs: Sequence[PairTokens], pair_ids: Sequence[int], pad_id: int,
               layout: str = "padded", row_tokens: int | None = None,
               row_multiple: int = 1) -> PackedBatch:
    """Lay out `pairs` as one micro-batch. row_tokens caps a packed row's length; rows are
    padded to a multiple of row_multiple (compiled kernels then see few distinct lengths)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}")
    p = len(pairs)
    b = _RowBuilder(p)
    if layout == "padded":
        for side in (CHOSEN, REJECTED):
            for i, x in enumerate(pairs):
                comp = x.chosen_ids if side == CHOSEN else x.rejected_ids
                _add_sequence(b, b.new_row(), x.prompt_ids, comp, 0,
                              i if side == CHOSEN else p + i)
        return b.build(pairs, pair_ids, pad_id, layout, row_multiple)
    if layout == "packed":
        seqs = [(i, side) for i in range(p) for side in (CHOSEN, REJECTED)]
        costs = [len(pairs[i].prompt_ids) + len(pairs[i].chosen_ids if s == CHOSEN
                                                 else pairs[i].rejected_ids) for i, s in seqs]
    else:
        seqs = [(i, PROMPT) for i in range(p)]
        costs = [segment_cost(x, layout) for x in pairs]
    capacity = row_tokens or sum(costs)
    for members in pack_rows(costs, capacity, row_multiple):
        row = b.new_row()
        for seg, k in enumerate(sorted(members)):
            i, side = seqs[k]
            x = pairs[i]
            if layout == "packed":
                comp = x.chosen_ids if side == CHOSEN else x.rejected_ids
                _add_sequence(b, row, x.prompt_ids, comp, seg, i if side == CHOSEN else p + i)
            else:
                _add_shared(b, row, x, seg, i)
    return b.build(pairs, pair_ids, pad_id, layout, row_multiple)


def padded_batch(pairs: Sequence[PairTokens], pair_ids: Sequence[int], pad_id: int) -> PackedBatch:
    return make_batch(pairs, pair_ids, pad_id, "padded")


# ---------------------------------------------------------------------------------------
# Micro-batches
# ---------------------------------------------------------------------------------------

def group_by_budget(order: Sequence[int], data: Sequence[PairTokens], layout: str,
                    max_tokens: int | None, pairs_per_micro: int) -> list[list[int]]:
    """Split pair indices into micro-batches: by token budget if given, else by pair count.

    Pairs are sorted by length first, so padded micro-batches pad little and packed ones fill
    evenly. With a budget, padded batches are charged for their padding (rows x longest).
    """
    idx = sorted(order, key=lambda i: data[i].num_tokens)
    if not max_tokens:
        return [idx[s:s + pairs_per_micro] for s in range(0, len(idx), pairs_per_micro)]
    groups: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    used = 0
    for i in idx:
        x = data[i]
        if layout == "padded":
            longest_new = max(longest, len(x.prompt_ids) + max(len(x.chosen_ids),
                                                                len(x.rejected_ids)))
            cost_new = 2 * (len(cur) + 1) * longest_new
        else:
            cost_new = used + segment_cost(x, layout)
        if cur and cost_new > max_tokens:
            groups.append(cur)
            cur, longest, used = [], 0, 0
            if layout == "padded":
                longest_new = len(x.prompt_ids) + max(len(x.chosen_ids), len(x.rejected_ids))
            cost_new = segment_cost(x, layout)
        cur.append(i)
        longest, used = (longest_new if layout == "padded" else longest), cost_new
    if cur:
        groups.append(cur)
    return groups


def micro_batches(order: Sequence[int], data: Sequence[PairTokens], pairs_per_micro: int,
                  pad_id: int, layout: str = "padded", max_tokens: int | None = None,
                  row_tokens: int | None = None, row_multiple: int = 1) -> Iterator[PackedBatch]:
    """One optimizer step's pairs as micro-batches in the given layout."""
    for group in group_by_budget(order, data, layout, max_tokens, pairs_per_micro):
        yield make_batch([data[i] for i in group], group, pad_id, layout, row_tokens,
                         row_multiple)


@dataclass(frozen=True)
class BatchPlan:
    """How pairs become micro-batches: built once from the recipe, passed everywhere.

    Training uses the plan as is; no-grad passes (evaluation, the reference pass) keep no
    activations for backward and take a `scaled` copy with more pairs and tokens per micro-batch.
    """

    layout: str  # padded / packed / shared_prefix
    kernel: str  # the model's attention implementation (attention.py builds its masks)
    pad_id: int
    pairs_per_micro: int
    max_tokens: int | None = None  # token budget per micro-batch (overrides pairs_per_micro)
    row_tokens: int | None = None  # cap on a packed row's length
    row_multiple: int = 1  # rows padded to a multiple of this (the kernel's block size)

    def micro_batches(self, ids: Sequence[int],
                      data: Sequence[PairTokens]) -> Iterator[PackedBatch]:
        return micro_batches(ids, data, self.pairs_per_micro, self.pad_id, self.layout,
                             self.max_tokens, self.row_tokens, self.row_multiple)

    def scaled(self, factor: int, pairs: int | None = None) -> "BatchPlan":
        """A plan for a no-grad pass: `factor` times the pairs and token budget."""
        return replace(self, pairs_per_micro=pairs or factor * self.pairs_per_micro,
                       max_tokens=factor * self.max_tokens if self.max_tokens else None)


# Micro-batch scale of the no-grad passes: evaluation keeps the policy's graph off, the
# reference pass also skips LoRA, so each fits about this many times a training micro-batch.
EVAL_SCALE, REFERENCE_SCALE = 2, 4


def plan_batches(layout: str, kernel: str, hidden_size: int, pad_id: int, pairs_per_micro: int,
                 max_tokens: int | None, device: torch.device | str = "cpu") -> BatchPlan:
    """The batch plan for a model: `auto` picks shared-prefix rows when the kernel takes them."""
    custom = attention.supports_layout_masks(kernel)
    if layout == "auto":
        layout = "shared_prefix" if custom else "padded"
    elif layout != "padded" and not custom:
        raise ModelError(f"train.layout {layout} needs an attention implementation that takes "
                         f"custom masks ({', '.join(attention.LAYOUT_MASK_KERNELS)}), not "
                         f"{kernel}. Set model.attn_implementation or train.layout: padded.")
    return BatchPlan(layout, kernel, pad_id, pairs_per_micro, max_tokens,
                     attention.row_cap(kernel, hidden_size),
                     attention.row_multiple(kernel, device))


# ---------------------------------------------------------------------------------------
# Which pairs form a step
# ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def pair_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The shuffled order of epoch `epoch`; cached, since every step of the epoch reads it."""
    order = list(range(n))
    random.Random(seed * 1000003 + epoch).shuffle(order)
    return tuple(order)


def step_pairs(n: int, pairs_per_step: int, seed: int, step: int) -> tuple[list[int], float]:
    """The data indices of optimizer step `step` (0-based) and the epoch position after it.

    A pure function of the step number, so a resumed run sees exactly the pairs an
    uninterrupted one would have seen (and any number of ranks can agree on it).
    """
    start = step * pairs_per_step
    out = []
    for pos in range(start, start + pairs_per_step):
        epoch, i = divmod(pos, n)
        out.append(pair_order(n, seed, epoch)[i])
    return out, (start + pairs_per_step) / n


def pairs_used(n: int, pairs_per_step: int, seed: int, start: int, stop: int) -> list[int]:
    """Every pair index that steps start..stop-1 read (what the reference pass must cover)."""
    return sorted({i for s in range(start, stop)
                   for i in step_pairs(n, pairs_per_step, seed, s)[0]})
