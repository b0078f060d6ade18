"""Attention: the kernel a model loads with, row caps, and the masks micro-batches get."""

from __future__ import annotations

import torch

import qdpo.forward as forward
import qdpo.logps as logps
from qdpo.attention import build_mask, kernel_for, row_cap
from qdpo.batching import make_batch
from qdpo.data import PairTokens
from qdpo.losses import LossParams, Objective
from tiny import make_pairs, tiny_lora_model

CPU = torch.device("cpu")


def test_kernel_for_and_row_cap():
    assert kernel_for("auto", CPU) == "sdpa"
    assert kernel_for("eager", CPU) == "eager"
    assert kernel_for("flex_attention", CPU) == "flex_attention"
    assert row_cap("sdpa", 64) == row_cap("eager", 128) == 256  # the floor for tiny models
    assert row_cap("sdpa", 4096) == 2048
    assert row_cap("sdpa", 16384) == 4096
    assert row_cap("flex_attention", 64) == row_cap("flex_attention", 4096) == 16384


def test_padded_mask_is_the_padding_mask():
    pairs = [PairTokens([5, 6], [7, 8, 9], [10]), PairTokens([11], [12], [13, 14])]
    b = make_batch(pairs, [0, 1], 0, "padded")
    mask = build_mask(b, "sdpa")
    lengths = [5, 2, 3, 3]  # chosen rows, then rejected rows
    assert mask.dtype == torch.long and mask.shape == (4, 5)
    assert mask.tolist() == [[1] * n + [0] * (5 - n) for n in lengths]


def expected_shared(lp, lc, lr):
    """What each token of one [prompt, chosen, rejected] segment may see."""
    n = lp + lc + lr
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(q + 1):
            allowed[q, k] = not (q >= lp + lc and lp <= k < lp + lc)
    return allowed


def test_shared_prefix_mask_hides_chosen_from_rejected():
    long, short = PairTokens([1, 2, 3], [4, 5], [6, 7, 8]), PairTokens([9, 10], [11], [12])
    b = make_batch([long, short], [0, 1], 0, "shared_prefix", row_tokens=8)
    mask = build_mask(b, "sdpa")
    assert mask.dtype == torch.bool and mask.shape == (2, 1, 8, 8)
    assert torch.equal(mask[0, 0], expected_shared(3, 2, 3))
    assert torch.equal(mask[1, 0, :4, :4], expected_shared(2, 1, 1))
    assert not mask[1, 0, :4, 4:].any()  # real tokens never see padding
    assert not mask[1, 0, 4:, :4].any() and mask[1, 0, 4:, 4:].diagonal().all()  # no empty row
    first_rejected = 5  # sees its prompt and itself, not the chosen tokens 3 and 4
    assert mask[0, 0, first_rejected].tolist() == [1, 1, 1, 0, 0, 1, 0, 0]

    eager = build_mask(b, "eager", torch.bfloat16)
    assert eager.dtype == torch.bfloat16 and eager.shape == mask.shape
    assert torch.equal(eager == 0, mask)
    assert bool((eager[~mask] == torch.finfo(torch.bfloat16).min).all())


def test_shared_prefix_segments_of_one_row_do_not_see_each_other():
    a, c = PairTokens([1, 2], [3], [4]), PairTokens([5], [6, 7], [8])
    b = make_batch([a, c], [0, 1], 0, "shared_prefix")
    assert b.input_ids.shape == (1, 8)
    mask = build_mask(b, "sdpa")[0, 0]
    seg = b.segments[0]
    assert bool((mask & (seg[:, None] != seg[None, :])).sum() == 0)
    for pair in (a, c):
        idx = (seg == seg[b.input_ids[0] == pair.prompt_ids[0]]).nonzero().flatten()
        n = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
        assert torch.equal(mask[idx][:, idx], expected_shared(*n))


def test_online_reference_builds_the_mask_once(monkeypatch):
    model = tiny_lora_model("llama")
    batch = make_batch(make_pairs(), range(5), 0, "shared_prefix")
    built, masks = [], []
    real_mask, real_logps = logps.batch_mask, forward.sequence_logps

    def counting_mask(*a, **k):
        built.append(1)
        return real_mask(*a, **k)

    def recording_logps(model, batch, mask=None):
        masks.append(mask)
        return real_logps(model, batch, mask)

    monkeypatch.setattr(forward, "batch_mask", counting_mask)
    monkeypatch.setattr(logps, "batch_mask", counting_mask)
    monkeypatch.setattr(forward, "sequence_logps", recording_logps)
    pol, ref, out = forward.forward_pair_batch(model, batch, Objective(["sigmoid"], LossParams()))
    assert len(built) == 1
    assert len(masks) == 2 and masks[0] is masks[1] and masks[0] is not None
    assert ref is not None and (pol.chosen - ref.chosen).abs().max() > 1e-4
    assert out.losses.shape == (5,) and out.losses.requires_grad


def test_flex_rows_are_bucketed_to_its_block_and_score_the_same():
    from qdpo.batching import plan_batches
    from qdpo.logps import sequence_logps

    plan = plan_batches("shared_prefix", "flex_attention", 64, 0, 8, None)
    assert plan.row_multiple == 128
    assert plan_batches("auto", "sdpa", 64, 0, 8, None).row_multiple == 1  # CPU: exact rows
    assert plan_batches("auto", "sdpa", 64, 0, 8, None, "cuda").row_multiple == 128
    pairs = make_pairs()
    (bucketed,) = plan.micro_batches(range(5), pairs)
    plain = make_batch([pairs[i] for i in bucketed.pair_ids], bucketed.pair_ids, 0,
                       "shared_prefix", row_tokens=plan.row_tokens)
    assert bucketed.input_ids.shape[1] == 256 and plain.input_ids.shape[1] < 256
    assert bucketed.real_slots == plain.real_slots
    model = tiny_lora_model("llama")
    with torch.no_grad():
        a, b = sequence_logps(model, bucketed), sequence_logps(model, plain)
    assert torch.allclose(a.chosen, b.chosen, atol=1e-4)
    assert torch.allclose(a.rejected, b.rejected, atol=1e-4)


def test_flex_attention_refuses_to_train_on_the_cpu():
    import pytest

    from qdpo.attention import check_can_train
    from qdpo.errors import ModelError

    with pytest.raises(ModelError, match="auto"):
        check_can_train("flex_attention", CPU)
    check_can_train("sdpa", CPU)
    check_can_train("flex_attention", torch.device("cuda"))


def test_flex_block_mask_scores_like_padded_sdpa_on_the_cpu():
    """The hand-built BlockMask (skipped, full and partial 128-token blocks from segment
    ranges) against the padded layout: rows here hold several pairs, with segment edges off
    the block edges, so every kind of block occurs. FlexAttention has no CPU backward, so this
    checks the forward; tests/test_gpu.py trains with it on CUDA."""
    from qdpo.attention import _block_mask
    from qdpo.batching import plan_batches
    from qdpo.logps import sequence_logps

    g = torch.Generator().manual_seed(3)

    def rand(lo, hi):
        n = int(torch.randint(lo, hi, (1,), generator=g))
        return torch.randint(3, 250, (n,), generator=g).tolist()

    # prompts of 2-3 blocks, so some blocks lie inside one segment's prompt (full ones)
    pairs = [PairTokens(rand(260, 400), rand(20, 150), rand(20, 150)) for _ in range(4)]
    sdpa = tiny_lora_model("llama")
    flex = tiny_lora_model("llama", "flex_attention")
    flex.load_state_dict(sdpa.state_dict())
    padded = make_batch(pairs, range(4), 0, "padded")
    for layout in ("shared_prefix", "packed"):
        plan = plan_batches(layout, "flex_attention", 64, 0, 8, None)
        (batch,) = plan.micro_batches(range(4), pairs)
        mask = _block_mask(batch.segments, batch.sides)
        partial, full = mask.kv_num_blocks.sum(), mask.full_kv_num_blocks.sum()
        blocks = batch.input_ids.shape[1] // 128
        assert partial > 0 and full > 0  # and fewer than all: some blocks are skipped
        assert partial + full < batch.input_ids.shape[0] * blocks * (blocks + 1) // 2
        with torch.no_grad():
            got = sequence_logps(flex, batch)
            want = sequence_logps(sdpa, padded)
        order = torch.tensor(batch.pair_ids)
        torch.testing.assert_close(got.chosen, want.chosen[order], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.rejected, want.rejected[order], atol=1e-4, rtol=1e-4)
