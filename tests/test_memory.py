"""`qdpo plan` and train.max_tokens auto: the memory arithmetic against GPU measurements."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from qdpo.bench import SHAPES
from qdpo.memory import (GIB, Settings, Shape, estimate, fit_tokens, parse_gib, plan_for,
                         token_budget, usable_bytes)
from qdpo.recipe import load_recipe
from tiny import QUICKSTART_RECIPE, REPO, qdpo

RECIPE_8B = REPO / "recipes" / "llama31-8b-ultrafeedback.yaml"


def shape(name: str) -> Shape:
    spec = dict(SHAPES[name])
    spec.pop("model_type")
    return Shape.from_config(SimpleNamespace(**spec))


# `qdpo bench` peak allocated memory on an H200 (2026-11-27): NF4 + double quant, LoRA r=16 on
# all linear layers, paged 8-bit AdamW, checkpointing, shared-prefix rows, reference
# precomputed. Tokens: the largest micro-batch (a 1k budget still takes a 1.5k-token pair).
# Then with the lean LoRA forward (tests/gpu_ab.py, one model build, 2026-11-27 evening): the
# 8B shape at 2k, 3k, 4k and 8k-token budgets.
MEASURED = [("llama-3.1-8b", 8192, 11.53), ("llama-3.1-8b", 1536, 7.07),
            ("llama-3.2-1b", 8192, 3.69),
            ("llama-3.1-8b", 2048, 7.28), ("llama-3.1-8b", 3072, 7.83),
            ("llama-3.1-8b", 4096, 8.42), ("llama-3.1-8b", 8192, 11.62)]


@pytest.mark.parametrize("name,tokens,gib", MEASURED)
def test_prediction_is_within_ten_percent_of_the_gpu_and_rarely_below(name, tokens, gib):
    predicted = estimate(shape(name), Settings(), tokens).peak / GIB
    assert 0.97 * gib <= predicted <= 1.10 * gib


def test_the_parts_follow_the_settings():
    s8b = shape("llama-3.1-8b")
    base = estimate(s8b, Settings(), 4096)
    assert estimate(s8b, Settings(optimizer="adamw"), 4096).lora > 1.5 * base.lora
    fewer = estimate(s8b, Settings(target_modules=("q_proj", "v_proj")), 4096)
    assert fewer.lora < base.lora / 5 and fewer.activations < base.activations
    assert estimate(s8b, Settings(checkpointing=False), 4096).activations > 5 * base.activations
    assert estimate(s8b, Settings(quantization="none"), 4096).base > 2.5 * base.base  # 16 vs 4 bits
    assert estimate(s8b, Settings(), 8192).activations == pytest.approx(2 * base.activations)


def test_the_fitted_budget_is_the_largest_that_fits():
    s8b, s = shape("llama-3.1-8b"), Settings()
    t24, t16 = fit_tokens(s8b, s, 24), fit_tokens(s8b, s, 16)
    assert t24 > t16 > 0 and t24 % 128 == 0
    assert estimate(s8b, s, t24).peak <= usable_bytes(24) < estimate(s8b, s, t24 + 128).peak
    assert fit_tokens(s8b, s, 6) == 0


def test_plan_command_says_what_fits_and_what_to_change():
    ok = qdpo("plan", RECIPE_8B, "--gpu-memory", "24GiB")
    assert ok.returncode == 0, ok.stderr
    assert "peak allocated" in ok.stdout and "fits." in ok.stdout
    budget = fit_tokens(shape("llama-3.1-8b"), Settings.from_recipe(load_recipe(RECIPE_8B)), 24)
    assert f"train.max_tokens up to {budget:,}" in ok.stdout
    assert f"longest pair that fits has {budget:,} tokens" in ok.stdout

    small = qdpo("plan", RECIPE_8B, "--gpu-memory", "7GiB")
    assert small.returncode == 1 and "use a card with more memory" in small.stderr

    long = qdpo("plan", RECIPE_8B, "data.max_length=8192", "--gpu-memory", "10GiB")
    assert long.returncode == 1 and "lower data.max_length to" in long.stderr

    big = qdpo("plan", RECIPE_8B, "train.max_tokens=40000", "--gpu-memory", "24GiB")
    assert big.returncode == 1 and "set train.max_tokens: auto" in big.stderr
    assert "micro-batches of 40,000 tokens" in big.stdout

    bad = qdpo("plan", RECIPE_8B, "--gpu-memory", "lots")
    assert bad.returncode != 0 and "24GiB" in bad.stderr and "Traceback" not in bad.stderr


def test_max_tokens_auto_is_the_plan_on_a_gpu_and_pairs_on_the_cpu(monkeypatch):
    r = load_recipe(RECIPE_8B, ["train.max_tokens=auto"])
    assert r.train.max_tokens == "auto"
    spec = dict(SHAPES["llama-3.1-8b"])
    spec.pop("model_type")
    config = SimpleNamespace(**spec)
    assert token_budget(r, config, torch.device("cpu")) is None
    monkeypatch.setattr("qdpo.device.total_memory_gib", lambda device: 24.0)
    assert token_budget(r, config, torch.device("cuda")) == plan_for(r, config, 24).max_tokens
    fixed = load_recipe(RECIPE_8B, ["train.max_tokens=4096"])
    assert token_budget(fixed, config, torch.device("cuda")) == 4096


def test_parse_gib():
    assert parse_gib("24GiB") == parse_gib("24 GB") == parse_gib("24") == 24.0
    for bad in ("-1G", "nan", "inf GiB", "0"):
        with pytest.raises(ValueError):
            parse_gib(bad)


def test_quickstart_trains_with_max_tokens_auto_on_the_cpu(tmp_path):
    res = qdpo("train", QUICKSTART_RECIPE, "train.max_steps=2", "train.max_tokens=auto",
               "-o", tmp_path / "run")
    assert res.returncode == 0, res.stderr


def test_bench_warns_how_slow_a_gpu_shape_is_on_the_cpu():
    from qdpo.bench import cpu_warning

    if torch.cuda.is_available():
        pytest.skip("the warning is for machines without a GPU")
    big = cpu_warning("llama-3.1-8b", 8, (128, 512), (64, 512), 8)
    small = cpu_warning("llama-3.2-1b", 8, (128, 512), (64, 512), 8)
    minutes = [int(w.split("roughly ")[1].split(" minutes")[0].replace(",", ""))
               for w in (big, small)]
    assert minutes[0] > minutes[1] > 1 and "--steps 2" in big
    # short pairs: the 4-bit weights' dequantization still costs seconds, and building a minute
    short = cpu_warning("llama-3.2-1b", 2, (8, 16), (8, 16), 8)
    assert "roughly 0" not in short and "building and quantizing the model" in short
    assert "--steps 2" not in short  # it already has what the tip would say
    assert cpu_warning("not-a-shape", 8, (1, 2), (1, 2), 8) is None


def test_offloading_moves_the_layer_inputs_off_the_card():
    s8b = shape("llama-3.1-8b")
    kept = estimate(s8b, Settings(), 8192)
    offloaded = estimate(s8b, Settings(offload=True), 8192)
    layer_inputs = (s8b.layers - 2) * s8b.hidden * 2 * 8192  # bf16, all but two in transit
    assert kept.activations - offloaded.activations == layer_inputs
    assert offloaded.base == kept.base and offloaded.lora == kept.lora


def test_sharded_weights_share_the_layers_and_the_plan_says_when_it_takes_more_cards():
    s70 = shape("llama-3.1-70b")
    whole = estimate(s70, Settings(optimizer="adamw"), 2048)
    halves = estimate(s70, Settings(optimizer="adamw", shards=2), 2048)
    layer = (whole.base - s70.vocab * s70.hidden * 2 * 2) / s70.layers  # one layer's 4-bit bytes
    assert halves.base == pytest.approx(whole.base / 2 + s70.vocab * s70.hidden * 2 + 2 * layer)
    assert halves.lora == pytest.approx(whole.lora / 2)
    assert halves.activations == whole.activations  # each rank still runs whole layers
    lone = qdpo("plan", RECIPE_8B, "--shape", "llama-3.1-70b")
    assert lone.returncode == 1 and "train.fsdp: true" in lone.stderr  # the way out is named
    sharded = ["--shape", "llama-3.1-70b", "train.fsdp=true", "train.optimizer=adamw",
               "train.max_tokens=auto"]
    two = qdpo("plan", RECIPE_8B, "--gpus", "2", *sharded)
    four = qdpo("plan", RECIPE_8B, "--gpus", "4", *sharded)
    assert two.returncode == 1 and "paged_adamw_8bit" not in two.stderr  # refused with fsdp
    assert four.returncode == 0, four.stderr
    assert "each of 4 24 GiB cards, weights sharded (train.fsdp)" in four.stdout


def _saved_bytes(recipe: object, tokens: int) -> tuple[int, int]:
    """Bytes autograd keeps for backward over a forward of `tokens` tokens (each storage
    once), and the activation dtype's size."""
    from qdpo.model import attach_lora, load_base

    torch.manual_seed(0)
    model = attach_lora(load_base(recipe, torch.device("cpu")), recipe)
    model.train()
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(10, 100, (1, tokens))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    return sum(seen.values()), hidden.element_size()


def test_lora_dropout_costs_what_the_planner_adds(tmp_path):
    """Dropout on the LoRA paths keeps a dropped copy of each path's input and its mask: the
    planner's extra bytes per token must be what autograd really keeps (a 4-bit model with
    LoRA on all linear layers, no checkpointing so every layer's share is counted)."""
    from qdpo.bench import bench_config
    from tiny import quickstart_recipe

    args = ("lora.target_modules=all-linear", "model.gradient_checkpointing=false")
    tokens = 64
    without, b = _saved_bytes(quickstart_recipe(tmp_path, *args, "lora.dropout=0"), tokens)
    recipe = quickstart_recipe(tmp_path, *args, "lora.dropout=0.1")
    with_dropout, _ = _saved_bytes(recipe, tokens)
    shape_ = Shape.from_config(bench_config(recipe, None))
    s = replace(Settings.from_recipe(recipe), dtype_bytes=b)  # the CPU computes in fp32
    assert s.lora_dropout == 0.1
    planned = (estimate(shape_, s, tokens).activations
               - estimate(shape_, replace(s, lora_dropout=0.0), tokens).activations) / tokens
    measured = (with_dropout - without) / tokens
    assert measured == pytest.approx(planned, rel=0.1)


def test_the_planners_copies_of_other_rooms_constants_agree():
    """memory.py runs without torch, so it keeps copies of two constants; they must not
    drift from the ones the code uses."""
    from qdpo import batching, logps, memory

    assert memory.HEAD_CHUNK_BYTES == logps.CHUNK_BYTES
    assert memory.REFERENCE_SCALE == batching.REFERENCE_SCALE


def test_the_embedding_table_on_the_host_leaves_the_card_only_when_untied():
    s8b, s1b = shape("llama-3.1-8b"), shape("llama-3.2-1b")
    assert not s8b.tied and s1b.tied
    host = Settings(host_embeddings=True)
    assert estimate(s8b, Settings(), 4096).base - estimate(s8b, host, 4096).base == \
        128256 * 4096 * 2  # 1 GiB less on the card
    assert estimate(s1b, host, 4096).base == estimate(s1b, Settings(), 4096).base
    small = qdpo("plan", RECIPE_8B, "--gpu-memory", "9GiB")
    assert small.returncode == 1 and "model.embeddings_on_host: true" in small.stderr
    hosted = qdpo("plan", RECIPE_8B, "--gpu-memory", "9GiB", "model.embeddings_on_host=true")
    assert "model.embeddings_on_host" not in hosted.stderr


def test_bench_sets_the_plans_prediction_beside_its_measured_peak():
    """The GPU row's "plan GiB": the planner's peak for the largest micro-batch the run made,
    the budget or a pair longer than it."""
    from qdpo.bench import _planned_peak_gib, bench_config
    from qdpo.data import PairTokens

    recipe = load_recipe(RECIPE_8B, ["train.max_tokens=2048"])
    config = bench_config(recipe, "llama-3.1-8b")
    ctx = SimpleNamespace(plan=SimpleNamespace(max_tokens=2048, layout="shared_prefix"))
    s8b, s = shape("llama-3.1-8b"), Settings.from_recipe(recipe)
    short = [PairTokens([5] * 100, [6] * 50, [7] * 50)]
    assert _planned_peak_gib(recipe, config, ctx, short, 1) == estimate(s8b, s, 2048).peak / GIB
    long = short + [PairTokens([5] * 3000, [6] * 500, [7] * 500)]  # 4,000 tokens, alone
    assert _planned_peak_gib(recipe, config, ctx, long, 1) == estimate(s8b, s, 4000).peak / GIB
    ctx.plan.max_tokens = None  # pairs per micro-batch: no token count to plan for
    assert _planned_peak_gib(recipe, config, ctx, short, 1) is None
