"""Every layout gives the padded layout's log-probs, losses and LoRA gradients."""

from __future__ import annotations

import random

import pytest
import torch

from qdpo.attention import build_mask
from qdpo.batching import (CHOSEN, LAYOUTS, PROMPT, REJECTED, group_by_budget, make_batch,
                           segment_cost)
from qdpo.logps import sequence_logps
from qdpo.losses import LossParams, PreferenceBatch, compute_loss
from tiny import make_pairs, tiny_lora_model

def run_layout(model, pairs, layout, row_tokens=None):
    model.zero_grad()
    batch = make_batch(pairs, range(len(pairs)), 0, layout, row_tokens)
    lp = sequence_logps(model, batch)
    with torch.no_grad(), model.disable_adapter():
        ref = sequence_logps(model, batch)
    pb = PreferenceBatch(lp.chosen, lp.rejected, batch.chosen_lengths, batch.rejected_lengths,
                         ref.chosen, ref.rejected, batch.weights)
    out = compute_loss("sigmoid", pb, LossParams(beta=0.5))
    out.losses.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return lp, out.losses.detach(), grads, batch


@pytest.mark.parametrize("arch, impl", [("llama", "sdpa"), ("qwen2", "sdpa"),
                                        ("mistral", "sdpa"), ("llama", "eager")])
def test_layouts_equal_padded(arch, impl):
    model = tiny_lora_model(arch, impl)
    pairs = make_pairs()
    lp0, loss0, g0, b0 = run_layout(model, pairs, "padded")
    assert g0 and all(g.abs().sum() > 0 for g in g0.values())
    for layout, rows in [("packed", None), ("packed", 40), ("shared_prefix", None),
                         ("shared_prefix", 50)]:
        lp, loss, g, b = run_layout(model, pairs, layout, rows)
        for name in ("chosen", "rejected", "chosen_public", "rejected_public"):
            assert torch.allclose(getattr(lp, name), getattr(lp0, name), atol=1e-4), \
                (layout, rows, name)
        assert torch.allclose(loss, loss0, atol=1e-5)
        assert g.keys() == g0.keys()
        for n in g0:
            assert torch.allclose(g[n], g0[n], atol=1e-5, rtol=1e-4), (layout, n)
        assert b.num_tokens == b0.num_tokens
        assert b.real_slots < b0.slots  # no padding wasted on shared or packed rows


def test_shared_prefix_computes_prompt_once_and_hides_chosen():
    pairs = make_pairs()
    b = make_batch(pairs, range(5), 0, "shared_prefix")
    assert b.real_slots == sum(segment_cost(p, "shared_prefix") for p in pairs)
    assert b.real_slots == sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)
                               for p in pairs)
    mask = build_mask(b, "sdpa")[0, 0]
    seg, side, pos = b.segments[0], b.sides[0], b.position_ids[0]
    for q in range(seg.shape[0]):
        for k in range(seg.shape[0]):
            expect = bool(seg[q] == seg[k] and k <= q
                          and not (side[q] == REJECTED and side[k] == CHOSEN)) or q == k
            assert bool(mask[q, k]) == expect
    # rejected positions continue the prompt, not the chosen reply
    p0 = pairs[0]
    first_rej = ((seg == seg[0]) & (side == REJECTED)).nonzero()[0].item()
    assert pos[first_rej] == len(p0.prompt_ids)
    assert int(((seg == seg[0]) & (side == PROMPT)).sum()) == len(p0.prompt_ids)


def test_wrong_mask_would_change_the_numbers(monkeypatch):
    """The equivalence test can fail: letting rejected see chosen changes rejected log-probs."""
    import qdpo.attention as attention

    model = tiny_lora_model("llama")
    pairs = make_pairs()
    lp0, *_ = run_layout(model, pairs, "padded")
    def leaky(seg, side):  # same segment and causal, but rejected may see chosen
        t = seg.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        return (((seg[:, :, None] == seg[:, None, :]) & causal)
                | torch.eye(t, dtype=torch.bool))[:, None]

    monkeypatch.setattr(attention, "allowed_matrix", leaky)
    lp, *_ = run_layout(model, pairs, "shared_prefix")
    assert (lp.rejected - lp0.rejected).abs().max() > 1e-3


@pytest.mark.parametrize("layout", LAYOUTS)
def test_token_budget_groups(layout):
    data = make_pairs() * 4
    groups = group_by_budget(range(len(data)), data, layout, 120, 2)
    assert sorted(i for g in groups for i in g) == list(range(len(data)))
    for g in groups:
        b = make_batch([data[i] for i in g], g, 0, layout)
        if len(g) > 1:  # a pair over the budget on its own still trains
            assert b.slots <= 120 if layout == "padded" else b.real_slots <= 120
    by_count = group_by_budget(range(len(data)), data, layout, None, 3)
    assert [len(g) for g in by_count] == [3] * 6 + [2]


def test_loss_normalisation_independent_of_micro_batching(tmp_path):
    """A step's loss (mean over pairs) is the same for any split into micro-batches."""
    model = tiny_lora_model("llama")
    pairs = make_pairs()
    _, whole, *_ = run_layout(model, pairs, "shared_prefix")
    parts = torch.cat([run_layout(model, pairs[:2], "shared_prefix")[1],
                       run_layout(model, pairs[2:], "packed")[1]])
    assert torch.allclose(whole.sum() / 5, parts.sum() / 5, atol=1e-6)


def test_rows_are_packed_for_the_fewest_padded_positions():
    """Rows are padded to the longest, so the fewest rows is not the least padding: first fit
    makes rows of 2000, 1800 and 300 tokens, 6,000 positions; spread over one row more, at
    most 1,200 tokens each, they take 4,800."""
    from qdpo.batching import _row_slots, _rows_first_fit, pack_rows

    costs = [1000, 1000, 900, 900, 300]
    first_fit = _rows_first_fit(costs, 2048)
    assert _row_slots(first_fit, costs, 1) == 3 * 2000
    rows = pack_rows(costs, 2048)
    assert sorted(i for row in rows for i in row) == list(range(5))
    assert all(sum(costs[i] for i in row) <= 2048 for row in rows)
    assert _row_slots(rows, costs, 1) == 4 * 1200
    # a pair longer than a row sets the width: the others fill rows up to it
    rows = pack_rows([3000, 1000, 1000, 900], 2048)
    assert len(rows) == 2 and _row_slots(rows, [3000, 1000, 1000, 900], 1) == 2 * 3000
    # never worse than first fit, never over the cap, every item once (random cases)
    rng = random.Random(0)
    for _ in range(300):
        costs = [rng.randint(1, 1500) for _ in range(rng.randint(1, 12))]
        cap, multiple = rng.choice([(1536, 1), (2048, 128), (4096, 128)])
        rows = pack_rows(costs, cap, multiple)
        assert sorted(i for row in rows for i in row) == list(range(len(costs)))
        assert all(row for row in rows)
        assert all(sum(costs[i] for i in row) <= max(cap, max(costs)) for row in rows)
        assert _row_slots(rows, costs, multiple) <= \
            _row_slots(_rows_first_fit(costs, cap), costs, multiple)
