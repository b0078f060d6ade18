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


def _arch_config(kind):
    """A tiny config of an architecture whose forward transforms the head's output."""
    from transformers import CohereConfig, Gemma2Config, GraniteConfig

    shape = dict(vocab_size=768, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 max_position_embeddings=256, initializer_range=0.2, pad_token_id=2,
                 bos_token_id=0, eos_token_id=1)
    if kind == "granite":  # forward divides the logits
        return GraniteConfig(logits_scaling=4.0, **shape)
    if kind == "cohere":  # forward multiplies them
        return CohereConfig(logit_scale=0.25, **shape)
    return Gemma2Config(final_logit_softcapping=0.5, **shape)  # forward caps them


@pytest.mark.parametrize("kind", ["granite", "cohere", "gemma2"])
def test_lean_logps_follow_the_models_logits_transform(kind, tmp_path):
    """Granite divides its logits by logits_scaling, Cohere multiplies them by logit_scale,
    Gemma 2 caps them: the lean head must give the full forward's log-probs (and the check at
    load must let these models through)."""
    from qdpo.logps import causal_lm, logits_transform

    _arch_config(kind).save_pretrained(tmp_path / kind)
    r = quickstart_recipe(tmp_path, f"model.name_or_path={tmp_path / kind}",
                          *(["model.attn_implementation=eager"] if kind == "gemma2" else []))
    model, _ = load_model(r)
    assert causal_lm(model).config.model_type == kind
    assert logits_transform(causal_lm(model)) == {"granite": (0.25, None),
                                                  "cohere": (0.25, None),
                                                  "gemma2": (None, 0.5)}[kind]
    g = torch.Generator().manual_seed(1)
    pairs = [PairTokens(*(torch.randint(3, 700, (n,), generator=g).tolist() for n in ns))
             for ns in ((5, 9, 3), (12, 2, 7))]
    model.eval()
    with torch.no_grad():
        lp = sequence_logps(model, padded_batch(pairs, range(2), 2))
        for i, p in enumerate(pairs):
            assert lp.chosen[i].item() == pytest.approx(
                naive(model, p.prompt_ids, p.chosen_ids).item(), abs=1e-3)
            assert lp.rejected[i].item() == pytest.approx(
                naive(model, p.prompt_ids, p.rejected_ids).item(), abs=1e-3)


def test_logit_scale_of_other_architectures_is_not_applied():
    """MPT's config has a logit_scale its forward never uses; only Cohere's multiplies."""
    from types import SimpleNamespace

    from qdpo.logps import logits_transform

    def lm(**cfg):
        return SimpleNamespace(config=SimpleNamespace(**cfg))

    assert logits_transform(lm(model_type="mpt", logit_scale=0.5)) == (None, None)
    assert logits_transform(lm(model_type="cohere2", logit_scale=0.5)) == (0.5, None)
    assert logits_transform(lm(model_type="granitemoe", logits_scaling=2)) == (0.5, None)
    assert logits_transform(lm(model_type="hyperclovax", logits_scaling=2)) == (2.0, None)
    assert logits_transform(lm(model_type="llama")) == (None, None)
