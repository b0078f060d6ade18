"""The lean LoRA forward computes what peft's does, on the real 4-bit layers and plain ones."""

from __future__ import annotations

import contextlib

import pytest
import torch
from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
from peft.tuners.lora.layer import Linear as LoraLinear

from qdpo.lora_forward import use_lean_lora
from qdpo.model import load_model, reference_mode
from tiny import quickstart_recipe


def _model(tmp_path, *overrides):
    model, _ = load_model(quickstart_recipe(tmp_path, "lora.target_modules=all-linear",
                                            *overrides))
    torch.manual_seed(0)
    for name, p in model.named_parameters():  # LoRA B starts at zero: make the update count
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    return model


def _logits_and_grads(model, ids, autocast):
    model.zero_grad(set_to_none=True)
    with autocast:
        logits = model(input_ids=ids).logits.float()
    logits.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("quant,autocast", [
    ("nf4", None), ("nf4", torch.bfloat16), ("none", None)])
def test_lean_forward_matches_peft(tmp_path, quant, autocast):
    model = _model(tmp_path, f"model.quantization={quant}")
    layer_type = LoraLinear4bit if quant == "nf4" else LoraLinear
    lora_layers = [m for m in model.modules() if type(m) is layer_type]
    assert lora_layers and all("forward" in m.__dict__ for m in lora_layers)  # lean by default
    ids = torch.randint(0, 100, (2, 12))
    ctx = (lambda: torch.autocast("cpu", dtype=autocast)) if autocast else contextlib.nullcontext
    lean = _logits_and_grads(model, ids, ctx())
    assert use_lean_lora(model, enabled=False) == len(lora_layers)
    assert not any("forward" in m.__dict__ for m in lora_layers)
    peft = _logits_and_grads(model, ids, ctx())
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lean[0], peft[0], **tol)
    assert lean[1].keys() == peft[1].keys() and len(lean[1]) == 2 * len(lora_layers)
    for name in lean[1]:
        torch.testing.assert_close(lean[1][name], peft[1][name], **tol)
    # the update really flows through the lean path: without adapters the logits differ
    use_lean_lora(model)
    with torch.no_grad(), reference_mode(model):
        base = model(input_ids=ids).logits.float()
    assert (base - lean[0]).abs().max() > 1e-3


def test_unusual_calls_take_peft_forward(tmp_path):
    model = _model(tmp_path)
    layer = next(m for m in model.modules() if type(m) is LoraLinear4bit)
    x = torch.randn(3, layer.in_features)
    expected = type(layer).forward(layer, x)
    torch.testing.assert_close(layer(x), expected)
    # a bf16 input without autocast: peft casts it to the fp32 LoRA weights, so the lean path
    # steps aside rather than mixing dtypes in one GEMM
    torch.testing.assert_close(layer(x.bfloat16()), type(layer).forward(layer, x.bfloat16()))
    with reference_mode(model):  # adapters disabled: the base layer alone
        torch.testing.assert_close(layer(x), layer.base_layer(x))
