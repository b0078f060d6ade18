"""Every loss trains the tiny model through the CLI: held-out preference accuracy rises."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qdpo.cli import app
from qdpo.recipe import LOSS_TYPES, REFERENCE_FREE_LOSSES
from tiny import QUICKSTART_RECIPE

# Per-loss settings where the defaults are not right for 12 steps on the toy task.
EXTRA = {"ipo": ["loss.beta=0.5"], "discopop": ["loss.discopop_tau=0.2"],
         "exo_pair": ["loss.label_smoothing=0.001"],
         "sft": [], "orpo": ["loss.beta=0.1"], "simpo": ["loss.beta=2.0", "loss.simpo_gamma=0.5"]}


def run(tmp_path, *args):
    res = CliRunner().invoke(app, ["train", str(QUICKSTART_RECIPE), *args, "-o",
                                   str(tmp_path / "run")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return res.output, rows, json.loads((tmp_path / "run" / "summary.json").read_text())


@pytest.mark.parametrize("loss", [t for t in LOSS_TYPES if t != "sft"])
def test_each_loss_learns_the_preference(tmp_path, loss):
    out, rows, summary = run(tmp_path, f"loss.type={loss}", "train.max_steps=12",
                             "eval.at_start=true", "eval.every_steps=0",
                             "eval.max_pairs=32", "data.max_pairs=192",
                             "train.learning_rate=3e-3", *EXTRA.get(loss, []))
    evals = [r for r in rows if "eval/rewards/accuracies" in r]
    start, end = evals[0], evals[-1]
    assert start["step"] == 0 and end["step"] == 12
    assert end["eval/rewards/accuracies"] >= 0.75, (loss, start, end)
    assert end["eval/rewards/accuracies"] > start["eval/rewards/accuracies"]
    assert end["eval/rewards/margins"] > start["eval/rewards/margins"]
    train = [r for r in rows if "loss" in r]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"):
        assert key in train[-1]
    if loss in REFERENCE_FREE_LOSSES:
        assert summary["reference"] == "none" and summary["reference_seconds"] == 0
        assert "logps/ref_chosen" not in train[-1]
        assert "reference-free" in out
    else:
        assert summary["reference"] == "precompute" and summary["reference_seconds"] > 0
        assert "logps/ref_chosen" in train[-1]
    if loss == "orpo":
        assert "log_odds_ratio" in train[-1] and "nll_loss" in train[-1]


def test_combined_losses_and_pair_weights(tmp_path):
    data = tmp_path / "weighted.jsonl"
    rows = [json.loads(x) for x in (QUICKSTART_RECIPE.parent / "quickstart" /
                                    "train.jsonl").read_text().splitlines()[:64]]
    data.write_text("".join(json.dumps(dict(r, weight=0.0 if i % 2 else 2.0)) + "\n"
                            for i, r in enumerate(rows)))
    out, rows_m, _ = run(tmp_path, "loss.type=[sigmoid,sft]", "loss.weights=[1.0,0.2]",
                         f"data.train={data}", "train.max_steps=4", "eval.max_pairs=16")
    train = [r for r in rows_m if "loss" in r]
    assert len(train) == 4 and rows_m[-1]["eval/rewards/accuracies"] >= 0.5
    assert "nll_loss" in train[0]  # the sft term ran beside sigmoid and reports its metric


def test_zero_pair_weights_train_nothing(tmp_path):
    """Pairs of weight 0 contribute no loss and no gradient: the adapter does not move."""
    from safetensors.torch import load_file

    data = tmp_path / "zero.jsonl"
    rows = [json.loads(x) for x in (QUICKSTART_RECIPE.parent / "quickstart" /
                                    "train.jsonl").read_text().splitlines()[:32]]
    data.write_text("".join(json.dumps(dict(r, weight=0.0)) + "\n" for r in rows))
    _, rows_m, _ = run(tmp_path, "loss.type=[sigmoid,sft]", "loss.weights=[1.0,0.2]",
                       f"data.train={data}", "train.max_steps=2", "eval.max_pairs=8")
    train = [r for r in rows_m if "loss" in r]
    assert [r["loss"] for r in train] == [0.0, 0.0]
    adapter = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(float(v.abs().max()) == 0.0 for v in lora_b)  # B starts at zero
