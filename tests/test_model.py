"""The 4-bit base, LoRA on top, and the reference from the same weights."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from qdpo.attention import build_mask
from qdpo.batching import padded_batch
from qdpo.data import prepare
from qdpo.logps import sequence_logps
from qdpo.errors import ModelError
from qdpo.model import (check_lean_head, load_base, load_model, load_tokenizer, reference_mode,
                        save_adapter, trainable_parameters)
from tiny import quickstart_recipe


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    r = quickstart_recipe(tmp_path_factory.mktemp("m"))
    tok = load_tokenizer(r)
    data = prepare(r, tok)
    return r, tok, data


def train_a_little(model, batch, steps):
    """A few optimizer steps that push chosen above rejected."""
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    model.train()
    for _ in range(steps):
        lp = sequence_logps(model, batch)
        (-(lp.chosen - lp.rejected).mean()).backward()
        opt.step()
        opt.zero_grad()


def test_base_is_really_4bit(setup):
    r, _, _ = setup
    model, info = load_model(r)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    # 2 layers x (q, k, v, o, gate, up, down); the output head stays in full precision
    assert len(layers) == 14 == info.quantized_layers
    w = layers[0].weight
    assert w.dtype == torch.uint8 and w.quant_state.quant_type == "nf4"
    assert w.quant_state.nested  # double quantization on by default
    assert not isinstance(model.get_base_model().lm_head, bnb.nn.Linear4bit)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert info.trainable_params == sum(p.numel() for p in trainable_parameters(model))


def test_fp4_and_unquantized(setup, tmp_path):
    r = quickstart_recipe(tmp_path, "model.quantization=fp4")
    m = load_base(r)
    layer = next(x for x in m.modules() if isinstance(x, bnb.nn.Linear4bit))
    assert layer.weight.quant_state.quant_type == "fp4"
    r = quickstart_recipe(tmp_path, "model.quantization=none")
    m = load_base(r)
    assert not any(isinstance(x, bnb.nn.Linear4bit) for x in m.modules())


def test_reference_is_base_and_policy_moves(setup):
    r, tok, data = setup
    model, _ = load_model(r)
    base = load_base(r)  # an independent copy, only for the comparison
    batch = padded_batch(data.train[:4], range(4), tok.pad_token_id)
    with torch.no_grad():
        base_out = base(input_ids=batch.input_ids, attention_mask=build_mask(batch, "sdpa")).logits
    train_a_little(model, batch, 3)
    model.eval()
    with torch.no_grad():
        policy = model(input_ids=batch.input_ids, attention_mask=build_mask(batch, "sdpa")).logits
        with reference_mode(model):
            ref = model(input_ids=batch.input_ids, attention_mask=build_mask(batch, "sdpa")).logits
    mask = build_mask(batch, "sdpa").bool()
    assert torch.allclose(ref[mask], base_out[mask], atol=1e-5)
    assert (policy[mask] - base_out[mask]).abs().max() > 1e-2
    # the reference forward left the adapters trainable and active
    assert all(p.requires_grad for p in trainable_parameters(model))
    assert trainable_parameters(model)


def test_init_adapter_becomes_frozen_reference(setup, tmp_path):
    r, tok, data = setup
    model, _ = load_model(r)
    batch = padded_batch(data.train[:4], range(4), tok.pad_token_id)
    train_a_little(model, batch, 2)
    model.eval()
    with torch.no_grad():
        sft = sequence_logps(model, batch)
    save_adapter(model, tok, tmp_path / "sft")

    r2 = quickstart_recipe(tmp_path, f"lora.init_adapter={tmp_path / 'sft'}")
    m2, info = load_model(r2)
    assert info.reference == "frozen initial adapter"
    m2.eval()
    with torch.no_grad():
        start = sequence_logps(m2, batch)
        with reference_mode(m2):
            ref0 = sequence_logps(m2, batch)
    assert torch.allclose(start.chosen, sft.chosen, atol=1e-4)
    assert torch.allclose(ref0.chosen, sft.chosen, atol=1e-4)
    assert trainable_parameters(m2)
    assert all("reference" not in n for n, p in m2.named_parameters() if p.requires_grad)
    train_a_little(m2, batch, 2)
    m2.eval()
    with torch.no_grad():
        after = sequence_logps(m2, batch)
        with reference_mode(m2):
            ref1 = sequence_logps(m2, batch)
    assert torch.allclose(ref1.chosen, ref0.chosen, atol=1e-5)  # reference never moves
    assert (after.chosen - ref1.chosen).abs().max() > 1e-3


def lora_grads(model, batch):
    model.train()
    model.zero_grad()
    lp = sequence_logps(model, batch)
    (lp.chosen.sum() + lp.rejected.sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_eval_forward_leaves_training_gradients_alone(setup):
    """bitsandbytes repacks a 4-bit weight for a CPU kernel without autograd the first time a
    layer runs in eval mode without gradients (AVX512-BF16 CPUs); qdpo must switch that off."""
    r, tok, data = setup
    model, _ = load_model(r)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.support_avx512bf16_for_cpu is False for m in layers)
    batch = padded_batch(data.train[:4], range(4), tok.pad_token_id)
    before = lora_grads(model, batch)
    model.eval()
    with torch.no_grad():
        sequence_logps(model, batch)
    after = lora_grads(model, batch)
    assert before and before.keys() == after.keys()
    for n in before:
        assert torch.allclose(before[n], after[n], atol=1e-5), n


def test_init_adapter_reports_the_adapters_own_lora(setup, tmp_path, caplog):
    """Starting from an adapter, what trains is that adapter's r/alpha/dropout, not the
    recipe's defaults: the model info and the banner say so."""
    from qdpo.console import model_banner

    r, tok, _ = setup
    small = quickstart_recipe(tmp_path, "lora.r=4", "lora.alpha=8")
    model, _ = load_model(small)
    save_adapter(model, tok, tmp_path / "sft4")
    r2 = quickstart_recipe(tmp_path, f"lora.init_adapter={tmp_path / 'sft4'}")
    assert r2.lora.r == 16  # the recipe's own setting differs
    _, info = load_model(r2)
    assert (info.lora_r, info.lora_alpha) == (4, 8.0)
    with caplog.at_level("INFO", logger="qdpo"):
        model_banner(r2, info)
    assert "LoRA r=4 alpha 8" in caplog.text


def test_unknown_logits_transform_is_refused_at_load(setup, monkeypatch):
    """A forward that does something to the logits the lean head does not know (here a tiny
    Llama whose forward scales them) must not train on wrong log-probs: load refuses."""
    from transformers import LlamaForCausalLM

    r, _, _ = setup
    forward = LlamaForCausalLM.forward

    def scaled(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        out.logits = out.logits * 3
        return out

    monkeypatch.setattr(LlamaForCausalLM, "forward", scaled)
    with pytest.raises(ModelError, match=r"does not support the logits transform of the 'llama' "
                                         r"architecture \(config.model_type\) yet"):
        load_model(r)
    monkeypatch.undo()
    load_model(r)  # the same model with its own forward loads


def test_lean_head_check_leaves_the_model_as_it_was(setup):
    """The load-time check runs in eval mode without gradients, which is exactly when
    bitsandbytes repacks 4-bit weights for its CPU kernel: it must not, and every module's
    mode, every flag, the weights and the RNG stay as they were."""
    r, _, _ = setup
    model, _ = load_model(r)
    model.train()
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    layers[0].eval()  # a mixed state must come back mixed
    for m in layers:  # bitsandbytes' own default on AVX512-BF16 CPUs
        m.support_avx512bf16_for_cpu = True
    modes = {n: m.training for n, m in model.named_modules()}
    weights = [m.weight.data.clone() for m in layers]
    rng = torch.random.get_rng_state()
    check_lean_head(model)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(m.support_avx512bf16_for_cpu is True for m in layers)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in layers)
    assert all(torch.equal(w, m.weight.data) for w, m in zip(weights, layers))
    assert torch.equal(rng, torch.random.get_rng_state())
    assert all(p.grad is None for p in model.parameters())
