"""Per-sequence log-probs: only completion tokens count, and the lean head is exact."""

from __future__ import annotations

import pytest
import torch

import qdpo.logps as logps_mod
from qdpo.batching import padded_batch
from qdpo.data import PairTokens
from qdpo.logps import sequence_logps
from qdpo.model import load_model, load_tokenizer, trainable_parameters
from tiny import quickstart_recipe


@pytest.fixture(scope="module")
def model_and_pairs(tmp_path_factory):
    r = quickstart_recipe(tmp_path_factory.mktemp("l"))
    tok = load_tokenizer(r)
    model, _ = load_model(r)
    g = torch.Generator().manual_seed(0)

    def rand(n):
        return torch.randint(3, 700, (n,), generator=g).tolist()

    pairs = [PairTokens(rand(9), rand(15), rand(4)),
             PairTokens(rand(30), rand(1), rand(22)),  # single-token response
             PairTokens(rand(2), rand(40), rand(40))]
    # make LoRA non-trivial so policy != base
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=g)
    return model, tok, pairs


def naive(model, prompt, completion):
    ids = torch.tensor([prompt + completion])
    logp = model(input_ids=ids).logits.float().log_softmax(-1)
    n = len(prompt)
    return logp[0, n - 1:-1].gather(-1, ids[0, n:, None]).sum()


def test_matches_full_logits_and_excludes_prompt(model_and_pairs):
    model, tok, pairs = model_and_pairs
    model.eval()
    with torch.no_grad():
        lp = sequence_logps(model, padded_batch(pairs, range(3), tok.pad_token_id))
        for i, p in enumerate(pairs):
            assert lp.chosen[i].item() == pytest.approx(naive(model, p.prompt_ids,
                                                              p.chosen_ids).item(), abs=1e-3)
            assert lp.rejected[i].item() == pytest.approx(naive(model, p.prompt_ids,
                                                                p.rejected_ids).item(), abs=1e-3)
    # prompt tokens do not count: changing the prompt's last token changes the score only
    # through conditioning, changing a completion token changes the count of scored tokens
    batch = padded_batch(pairs, range(3), tok.pad_token_id)
    assert batch.targets.numel() == sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)


def test_public_logps_cover_shared_length(model_and_pairs):
    model, tok, pairs = model_and_pairs
    model.eval()
    with torch.no_grad():
        lp = sequence_logps(model, padded_batch(pairs, range(3), tok.pad_token_id))
        p = pairs[0]  # chosen 15 tokens, rejected 4: public part of chosen = first 4 tokens
        expect = naive(model, p.prompt_ids, p.chosen_ids[:4]).item()
    assert lp.chosen_public[0].item() == pytest.approx(expect, abs=1e-3)
    assert lp.rejected_public[0].item() == pytest.approx(lp.rejected[0].item(), abs=1e-5)


def test_chunked_head_gradients_equal_naive(model_and_pairs, monkeypatch):
    model, tok, pairs = model_and_pairs
    model.train()
    params = trainable_parameters(model)
    batch = padded_batch(pairs, range(3), tok.pad_token_id)
    # tiny chunks: many checkpointed pieces, recomputed in backward
    monkeypatch.setattr(logps_mod, "CHUNK_BYTES", 4 * 768 * 16)
    lp = sequence_logps(model, batch)
    (lp.chosen.sum() - 2 * lp.rejected.sum()).backward()
    got = [p.grad.clone() for p in params]
    model.zero_grad()
    ref = sum(naive(model, p.prompt_ids, p.chosen_ids) - 2 * naive(model, p.prompt_ids,
                                                                    p.rejected_ids)
              for p in pairs)
    ref.backward()
    for g, p in zip(got, params):
        assert torch.allclose(g, p.grad, atol=1e-4, rtol=1e-3)
    model.zero_grad()
    assert any(g.abs().sum() > 0 for g in got)
