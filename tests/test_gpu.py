"""CUDA-only checks, skipped without a GPU: bf16 training, paged 8-bit AdamW, FlexAttention.

On a GPU machine: `python -m pytest -q -m gpu tests/test_gpu.py`.
"""

from __future__ import annotations

import json

import pytest
import torch

from tiny import QUICKSTART_RECIPE, qdpo

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_quickstart_trains_on_cuda_in_bf16(tmp_path):
    res = qdpo("train", QUICKSTART_RECIPE, "train.max_steps=24",
               "train.optimizer=paged_adamw_8bit", "-o", tmp_path / "run")
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval"]["rewards/accuracies"] >= 0.9
    assert summary["train"]["mem/peak_alloc_gib"] > 0
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["compute_dtype"] in ("bfloat16", "float16")


def test_flex_attention_shared_prefix_equals_padded_sdpa():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from qdpo.batching import make_batch
    from qdpo.data import PairTokens
    from qdpo.logps import sequence_logps

    g = torch.Generator().manual_seed(0)

    def rand(n):
        return torch.randint(3, 250, (n,), generator=g).tolist()

    pairs = [PairTokens(rand(9), rand(15), rand(4)), PairTokens(rand(40), rand(1), rand(22)),
             PairTokens(rand(130), rand(70), rand(90))]
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").cuda()
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        ref = sequence_logps(model, make_batch(pairs, range(3), 0, "padded").to("cuda"))
        model.get_base_model().set_attn_implementation("flex_attention")
        flex = sequence_logps(model, make_batch(pairs, range(3), 0, "shared_prefix")
                              .to("cuda"))
    assert torch.allclose(flex.chosen, ref.chosen, atol=1e-3)
    assert torch.allclose(flex.rejected, ref.rejected, atol=1e-3)


def test_bench_random_weights_on_cuda(tmp_path):
    out = tmp_path / "b.json"
    res = qdpo("bench", QUICKSTART_RECIPE, "--random-weights", "--steps", "4", "--warmup", "1",
               "--prompt-len", "32-64", "--response-len", "16-64", "--json", out)
    assert res.returncode == 0, res.stderr
    row = json.loads(out.read_text())[0]
    assert row["peak_alloc_gib"] > 0 and row["peak_reserved_gib"] >= row["peak_alloc_gib"]


def test_fp16_trains_with_gradient_scaling_and_saves_the_scaler(tmp_path):
    run = tmp_path / "run"
    res = qdpo("train", QUICKSTART_RECIPE, "train.max_steps=8", "model.compute_dtype=fp16",
               "output.save_every_steps=4", "-o", run)
    assert res.returncode == 0, res.stderr
    assert json.loads((run / "run.json").read_text())["compute_dtype"] == "float16"
    state = json.loads(next((run / "checkpoints").glob("*/trainer_state.json")).read_text())
    assert state["scaler"] is not None  # the gradient scaler's state is saved (null in bf16)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["train"]["loss"] == summary["train"]["loss"]


def test_flex_attention_trains_on_cuda(tmp_path):
    res = qdpo("train", QUICKSTART_RECIPE, "train.max_steps=4",
               "model.attn_implementation=flex_attention", "-o", tmp_path / "run")
    assert res.returncode == 0, res.stderr
    assert "(flex_attention attention)" in res.stdout  # the plan banner: what really ran


def test_out_of_memory_is_one_message_with_what_to_change():
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, 4 * 2**30 / total))
    try:
        res = qdpo("bench", QUICKSTART_RECIPE, "--shape", "llama-3.2-1b", "--steps", "2",
                   "--warmup", "1", "train.max_tokens=65536", "train.pairs_per_step=64",
                   "--prompt-len", "512-1024", "--response-len", "256-512")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert res.returncode != 0
    assert "Out of GPU memory" in res.stderr and "qdpo plan" in res.stderr
    assert "Traceback" not in res.stderr


def test_offloaded_checkpointing_on_cuda(tmp_path):
    from qdpo.model import load_model
    from qdpo.offload import use_offloaded_checkpointing
    from tiny import quickstart_recipe

    model, _ = load_model(quickstart_recipe(tmp_path, "lora.dropout=0.3"))
    ids = torch.randint(0, 100, (4, 256), device="cuda")

    def grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(input_ids=ids).logits.float().square().mean().backward()
        torch.cuda.synchronize()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    expected = grads()
    assert use_offloaded_checkpointing(model) == 2
    got = grads()  # pinned host copies, asynchronous both ways, dropout masks redrawn
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=2e-2, atol=1e-3)
    res = qdpo("train", QUICKSTART_RECIPE, "train.max_steps=4", "model.offload_activations=true",
               "train.compile=true", "-o", tmp_path / "run")
    assert res.returncode == 0, res.stderr


def test_embeddings_on_host_on_cuda(tmp_path):
    """model.embeddings_on_host on a GPU: the same loss and LoRA gradients (looked-up rows
    through a pinned buffer, asynchronous copies, offloaded checkpointing), the same greedy
    generation (ids on the GPU), and the table's bytes off the card."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from qdpo.batching import make_batch
    from qdpo.forward import forward_pair_batch
    from qdpo.losses import Objective
    from qdpo.model import load_model
    from qdpo.offload import embeddings_to_host, host_embedding
    from tiny import make_pairs, quickstart_recipe

    recipe = quickstart_recipe(tmp_path, "model.offload_activations=true")
    objective = Objective.from_config(recipe.loss)

    def step(model):
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():  # the same LoRA B, away from zero, in every model
            for n, p in sorted(model.named_parameters()):
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        model.zero_grad(set_to_none=True)
        model.train()
        batch = make_batch(make_pairs(), range(5), 2, "packed").to("cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward_pair_batch(model, batch, objective)[2].losses.sum()
        loss.backward()
        torch.cuda.synchronize()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                             if p.requires_grad}

    model, _ = load_model(recipe)
    loss, grads = step(model)
    hosted, _ = load_model(quickstart_recipe(tmp_path, "model.offload_activations=true",
                                             "model.embeddings_on_host=true"))
    emb = host_embedding(hosted)
    assert emb is not None and emb.table.device.type == "cpu" and emb.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in hosted.parameters())
    host_loss, host_grads = step(hosted)
    assert host_loss == pytest.approx(loss, rel=1e-4)
    assert host_grads.keys() == grads.keys()
    for name, grad in host_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, grads[name], rtol=1e-3, atol=1e-5)

    # memory: an untied model with a table big enough to see (32000 x 256 bf16 = 15.6 MiB)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda().eval()
    ids = torch.randint(0, 32000, (2, 12), device="cuda")
    with torch.no_grad():
        logits = plain(input_ids=ids).logits
        text = plain.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    table_bytes = 32000 * 256 * 2
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    assert embeddings_to_host(plain)
    after = torch.cuda.memory_allocated()
    assert before - after == pytest.approx(table_bytes, abs=2**16)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, logits, rtol=0, atol=0)
        assert torch.equal(plain.generate(input_ids=ids, max_new_tokens=6, do_sample=False),
                           text)


@pytest.mark.parametrize("reference", ["online", "precompute"])
def test_micro_batches_are_queued_without_waiting_for_the_gpu(tmp_path, reference):
    """Host work (building and copying the next micro-batch) overlaps the GPU only while the
    CPU never waits for it inside a step: one `.item()`, boolean index or blocking copy per
    micro-batch leaves the GPU idle while the CPU catches up. torch's sync debug mode turns
    every such wait into an error; the step's one wait, for its metrics, is outside."""
    from qdpo import reference as ref_mod
    from qdpo.bench import synthetic_pairs
    from qdpo.device import autocast_for
    from qdpo.forward import forward_pair_batch
    from qdpo.logps import causal_lm
    from qdpo.model import load_model
    from qdpo.train import step_context
    from tiny import quickstart_recipe

    recipe = quickstart_recipe(tmp_path, "train.max_tokens=256", "model.offload_activations=true",
                               "model.embeddings_on_host=true", f"train.reference={reference}")
    model, info = load_model(recipe)
    ctx = step_context(recipe, model, 0, info.device, info.dtype, steps=4)
    data = synthetic_pairs(8, causal_lm(model).config.vocab_size, (8, 40), (4, 30), 0)
    if reference == "precompute":
        ctx.reference, _ = ref_mod.ensure(model, data, range(8), ctx.plan, info.device,
                                          info.dtype, key=None, what="test")

    def one_pass():
        batches = list(ctx.plan.micro_batches(range(8), data))
        assert len(batches) > 1
        for batch in batches:
            batch.to(ctx.device)
            got = ctx.reference.get(batch.pair_ids, ctx.device) if ctx.reference else None
            with autocast_for(ctx.device, ctx.dtype):
                out = forward_pair_batch(model, batch, ctx.objective, got)[2]
            out.losses.sum().backward()

    model.train()
    one_pass()  # lazy set-up (cuBLAS handles, allocator pools) may wait once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        one_pass()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_bench_does_not_count_what_the_process_held_before():
    """With --against trl, TRL runs first in the same process; what it leaves allocated is
    not qdpo's peak."""
    from qdpo.bench import run_bench
    from qdpo.recipe import load_recipe

    recipe = load_recipe(QUICKSTART_RECIPE, ["train.pairs_per_step=4",
                                             "train.micro_batch_pairs=2"])
    alone = run_bench(recipe, steps=2, warmup=1, quiet=True)
    leftover = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # 0.25 GiB
    after = run_bench(recipe, steps=2, warmup=1, quiet=True)
    assert after.extra["held_before_gib"] >= 0.25
    assert after.peak_alloc_gib == pytest.approx(alone.peak_alloc_gib, abs=0.05)
    del leftover
