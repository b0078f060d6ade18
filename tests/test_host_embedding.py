"""model.embeddings_on_host: the input embedding table in host memory, the same numbers.

On the CPU the host table is the CPU table and nothing is pinned; the code path is otherwise
the one a GPU takes (the table off the module's parameters, the lookup on the batch's host
ids, the embedding's hooks firing), so a broken swap shows here too.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from qdpo.batching import make_batch
from qdpo.errors import RecipeError
from qdpo.forward import forward_pair_batch
from qdpo.losses import Objective
from qdpo.model import _device_of, load_model
from qdpo.offload import (HostEmbedding, embeddings_stay_because, embeddings_to_host,
                          host_embedding)
from tiny import QUICKSTART, QUICKSTART_RECIPE, make_pairs, qdpo, quickstart_recipe, read_metrics


def _tiny_llama(tied: bool = False):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def _holds(tensors, table):
    """Whether any of `tensors` is (a view of) the table's storage."""
    return any(t.untyped_storage().data_ptr() == table.untyped_storage().data_ptr()
               for t in tensors)


def test_the_table_leaves_the_modules_parameters_and_state(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = _tiny_llama()
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    table = base.get_input_embeddings().weight.detach().clone()
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    assert embeddings_to_host(model)  # through peft's wrapper
    emb = model.get_input_embeddings()
    assert isinstance(emb, HostEmbedding) and emb is base.model.embed_tokens
    assert host_embedding(model) is emb and embeddings_to_host(model)  # a second call: no-op
    assert torch.equal(emb.weight, table) and emb.weight.device.type == "cpu"
    assert (emb.num_embeddings, emb.embedding_dim) == (256, 64)
    assert not _holds(list(model.parameters()) + list(model.buffers()), emb.table)
    assert not any("embed_tokens" in k for k in model.state_dict())
    assert not any("embed_tokens" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "adapter")  # an adapter as before, no embeddings in it
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    # model.to moves no table: the compute device and dtype follow, the table stays a plain
    # host tensor (cast, never registered)
    model.to(torch.float64)
    assert emb.table.dtype == torch.float64 and emb.table.device.type == "cpu"
    assert emb(ids).dtype == torch.float64
    assert not _holds(list(model.parameters()) + list(model.buffers()), emb.table)
    model.to("meta")
    assert emb.device.type == "meta" and emb.table.device.type == "cpu"
    assert _device_of(model).type == "meta"  # the compute device, not the table's


def test_hooks_on_the_embedding_carry_over_and_still_come_off():
    model = _tiny_llama()
    model.enable_input_require_grads()  # the hook qdpo's checkpointing needs
    assert embeddings_to_host(model)
    emb = model.get_input_embeddings()
    ids = torch.randint(0, 256, (1, 5))
    assert emb(ids).requires_grad  # the hook registered on the old module fires here
    model.disable_input_require_grads()  # and its handle removes it from the new one
    assert not emb(ids).requires_grad


def test_a_tied_or_special_embedding_stays():
    tied = _tiny_llama(tied=True)
    assert "shares its table" in embeddings_stay_because(tied)
    assert not embeddings_to_host(tied)
    assert type(tied.get_input_embeddings()) is torch.nn.Embedding
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight

    class Scaled(torch.nn.Embedding):  # as Gemma's: the lookup does more than a lookup
        def forward(self, ids):
            return super().forward(ids) * 2.0

    model = _tiny_llama()
    old = model.get_input_embeddings()
    scaled = Scaled(old.num_embeddings, old.embedding_dim)
    model.set_input_embeddings(scaled)
    assert "not a plain torch.nn.Embedding" in embeddings_stay_because(model)
    assert not embeddings_to_host(model) and model.get_input_embeddings() is scaled


def test_the_batch_keeps_its_host_ids_and_the_lookup_uses_them(tmp_path, monkeypatch):
    batch = make_batch(make_pairs(), range(5), 2, "packed")
    ids = batch.input_ids
    batch.to("meta")  # a device that is not the host: the host copy must stay behind
    assert batch.input_ids.device.type == "meta"
    assert batch.host_input_ids is ids and batch.host_input_ids.device.type == "cpu"

    from qdpo.logps import sequence_logps

    model, _ = load_model(quickstart_recipe(tmp_path, "model.embeddings_on_host=true"))
    seen = []
    forward = HostEmbedding.forward
    monkeypatch.setattr(HostEmbedding, "forward", lambda self, x: seen.append(x) or
                        forward(self, x))
    batch = make_batch(make_pairs(), range(5), 2, "packed").to("cpu")
    batch.host_input_ids = batch.host_input_ids.clone()  # on the CPU they are one tensor
    model.eval()
    with torch.no_grad():
        sequence_logps(model, batch)
    assert len(seen) == 1 and seen[0] is batch.host_input_ids


def _lora_grads(tmp_path, *overrides, layout="packed"):
    recipe = quickstart_recipe(tmp_path, *overrides)
    model, info = load_model(recipe)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # LoRA B away from zero: lora_A gets gradients too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=g)
    model.train()
    objective = Objective.from_config(recipe.loss)
    batch = make_batch(make_pairs(), range(5), 2, layout).to(info.device)
    pol, ref, out = forward_pair_batch(model, batch, objective)
    loss = out.losses.sum()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return model, loss.detach(), pol, grads


@pytest.mark.parametrize("offload", [False, True])
def test_training_gives_the_same_loss_and_lora_gradients(tmp_path, offload):
    """With checkpointing, and with offloaded checkpointing: the reentrant recompute gives
    LoRA gradients only if the first layer's input requires grad, which the hook on the
    embedding (now a HostEmbedding) must still set."""
    common = ["model.gradient_checkpointing=true", f"model.offload_activations={offload}"]
    dev_model, dev_loss, dev_pol, dev_grads = _lora_grads(tmp_path, *common)
    host_model, host_loss, host_pol, host_grads = _lora_grads(
        tmp_path, *common, "model.embeddings_on_host=true")
    assert host_embedding(dev_model) is None
    emb = host_embedding(host_model)
    assert emb is not None
    assert not _holds(list(host_model.parameters()), emb.table)
    torch.testing.assert_close(host_loss, dev_loss)
    torch.testing.assert_close(host_pol.chosen, dev_pol.chosen)
    assert host_grads.keys() == dev_grads.keys() and len(host_grads) == 2 * 7 * 2
    for name, grad in host_grads.items():
        assert grad is not None and grad.abs().sum() > 0, name  # not silently zero
        torch.testing.assert_close(grad, dev_grads[name])


def test_a_tied_model_trains_unchanged_and_says_so(tmp_path, caplog):
    cfg = json.loads((QUICKSTART / "model" / "config.json").read_text())
    tied = tmp_path / "tied"
    tied.mkdir()
    (tied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tied / f).write_bytes((QUICKSTART / "model" / f).read_bytes())
    with caplog.at_level(logging.INFO, logger="qdpo"):
        model, _ = load_model(quickstart_recipe(tmp_path, f"model.name_or_path={tied}",
                                                "model.embeddings_on_host=true"))
    assert host_embedding(model) is None
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("model.embeddings_on_host has no effect" in m and "shares its table" in m
               for m in warned)


def test_a_training_run_with_the_table_on_the_host(tmp_path):
    args = ["train", QUICKSTART_RECIPE, "train.max_steps=3", "eval.every_steps=3",
            "eval.sample_prompts=[Say hello.]", "eval.sample_max_new_tokens=4"]
    host = qdpo(*args, "model.embeddings_on_host=true", "-o", tmp_path / "host")
    assert host.returncode == 0, host.stderr
    assert "model.embeddings_on_host: the input embedding table" in host.stdout
    dev = qdpo(*args, "-o", tmp_path / "dev")
    assert dev.returncode == 0, dev.stderr
    got, want = read_metrics(tmp_path / "host"), read_metrics(tmp_path / "dev")
    losses = [(a["loss"], b["loss"]) for a, b in zip(got, want) if "loss" in a]
    assert len(losses) == 3 and all(a == pytest.approx(b, rel=1e-5) for a, b in losses)
    evals = [(a, b) for a, b in zip(got, want) if "eval/loss" in a]
    assert evals and evals[-1][0]["eval/loss"] == pytest.approx(evals[-1][1]["eval/loss"],
                                                                rel=1e-5)
    # the sample answers were generated by the model with the table on the host (greedy:
    # the same words as without it)
    rows = [json.loads(x) for x in (tmp_path / "host" / "samples.jsonl").read_text()
            .splitlines()]
    want_rows = [json.loads(x) for x in (tmp_path / "dev" / "samples.jsonl").read_text()
                 .splitlines()]
    assert [r["step"] for r in rows] == [3]
    assert [(r["response"], r["base_response"]) for r in rows] == \
        [(r["response"], r["base_response"]) for r in want_rows]
    # the run's model loads after training as any other (chat, eval, generate)
    res = qdpo("eval", tmp_path / "host", "--data", QUICKSTART / "eval.jsonl", "--max-pairs", "8")
    assert res.returncode == 0, res.stderr


def test_bench_with_the_table_on_the_host(tmp_path):
    out = tmp_path / "bench.json"
    res = qdpo("bench", QUICKSTART_RECIPE, "model.embeddings_on_host=true",
               "train.pairs_per_step=4", "train.micro_batch_pairs=4", "--random-weights",
               "--steps", "2", "--warmup", "1", "--prompt-len", "8-24", "--response-len",
               "4-16", "--json", out)
    assert res.returncode == 0, res.stderr
    assert "model.embeddings_on_host: the input embedding table" in res.stdout + res.stderr
    assert json.loads(out.read_text())[0]["tokens_per_s"] > 0


def test_not_with_fsdp(tmp_path):
    with pytest.raises(RecipeError, match="model.embeddings_on_host.*train.fsdp"):
        quickstart_recipe(tmp_path, "model.embeddings_on_host=true", "train.fsdp=true")
    res = qdpo("train", QUICKSTART_RECIPE, "model.embeddings_on_host=true", "train.fsdp=true",
               "-o", tmp_path / "run")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "model.embeddings_on_host" in res.stderr and "train.fsdp" in res.stderr
