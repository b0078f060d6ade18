"""model.offload_activations: the same gradients as torch's checkpointing, inputs kept off the
device."""

from __future__ import annotations

import contextlib

import pytest
import torch

from qdpo.errors import RecipeError
from qdpo.model import load_model
from qdpo.offload import offloaded_checkpoint, use_offloaded_checkpointing
from tiny import QUICKSTART_RECIPE, qdpo, quickstart_recipe, read_metrics, tiny_lora_model


def _grads(model, ids, autocast=None):
    model.zero_grad(set_to_none=True)
    model.train()
    torch.manual_seed(1)  # the same LoRA dropout masks in both runs
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    with ctx:
        logits = model(input_ids=ids).logits.float()
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None}


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_offloaded_checkpointing_gives_the_same_gradients(tmp_path, autocast):
    # the quickstart model, 4-bit, LoRA dropout 0.05: the recompute must redraw its masks
    recipe = quickstart_recipe(tmp_path, "lora.dropout=0.3")
    model, _ = load_model(recipe)
    ids = torch.randint(0, 100, (2, 16))
    expected = _grads(model, ids, autocast)
    assert use_offloaded_checkpointing(model) == 2
    layer = next(m for m in model.modules() if type(m).__name__.endswith("DecoderLayer"))
    assert layer._gradient_checkpointing_func is offloaded_checkpoint
    got = _grads(model, ids, autocast)
    torch.testing.assert_close(got[0], expected[0])
    assert got[1].keys() == expected[1].keys() and len(got[1]) == 2 * 7 * 2
    for name in got[1]:
        torch.testing.assert_close(got[1][name], expected[1][name])
    # and back on the card, as a benchmark switching settings on one model does
    assert use_offloaded_checkpointing(model, enabled=False) == 2
    assert layer._gradient_checkpointing_func is not offloaded_checkpoint
    back = _grads(model, ids, autocast)
    for name in back[1]:
        torch.testing.assert_close(back[1][name], expected[1][name])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_offloading_on_every_architecture(arch):
    model = tiny_lora_model(arch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    ids = torch.randint(0, 256, (2, 20))
    expected = _grads(model, ids)
    assert use_offloaded_checkpointing(model) == 2
    got = _grads(model, ids)
    for name in expected[1]:
        torch.testing.assert_close(got[1][name], expected[1][name])


def test_a_training_run_with_offloading(tmp_path):
    res = qdpo("train", QUICKSTART_RECIPE, "train.max_steps=3", "model.offload_activations=true",
               "-o", tmp_path / "run")
    assert res.returncode == 0, res.stderr
    ref = qdpo("train", QUICKSTART_RECIPE, "train.max_steps=3", "-o", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    got = [m["loss"] for m in read_metrics(tmp_path / "run") if "loss" in m]
    want = [m["loss"] for m in read_metrics(tmp_path / "ref") if "loss" in m]
    assert len(got) == 3 and got == pytest.approx(want, rel=1e-5)


def test_offloading_needs_checkpointing(tmp_path):
    with pytest.raises(RecipeError, match="gradient_checkpointing"):
        quickstart_recipe(tmp_path, "model.offload_activations=true",
                          "model.gradient_checkpointing=false")
