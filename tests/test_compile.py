"""train.compile: compiled decoder layers train to the same numbers as eager ones."""

from __future__ import annotations

import json

from tiny import QUICKSTART_RECIPE, qdpo, read_metrics


def test_compiled_layers_train_like_eager_ones(tmp_path):
    args = ["train", QUICKSTART_RECIPE, "train.max_steps=3", "eval.every_steps=3",
            "eval.sample_prompts=[Say hello.]", "eval.sample_max_new_tokens=4"]
    eager = qdpo(*args, "-o", tmp_path / "eager")
    assert eager.returncode == 0, eager.stderr
    compiled = qdpo(*args, "train.compile=true", "-o", tmp_path / "compiled")
    assert compiled.returncode == 0, compiled.stderr
    a, b = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled")
    losses = [(x["loss"], y["loss"]) for x, y in zip(a, b) if "loss" in x]
    assert len(losses) == 3
    for x, y in losses:
        assert abs(x - y) < 1e-3 * max(1.0, abs(x))
    # the samples were generated (eagerly) by the compiled model too
    rows = (tmp_path / "compiled" / "samples.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [3]


def test_compile_wraps_every_decoder_layer(tmp_path):
    from qdpo.model import load_model
    from tiny import quickstart_recipe

    model, _ = load_model(quickstart_recipe(tmp_path, "train.compile=true"))
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    assert len(layers) == 2 and all(m._compiled_call_impl is not None for m in layers)
    eager, _ = load_model(quickstart_recipe(tmp_path))
    assert all(m._compiled_call_impl is None for m in eager.modules()
               if type(m).__name__.endswith("DecoderLayer"))
