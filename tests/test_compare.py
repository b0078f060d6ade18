"""`qdpo bench --against trl`: TRL's DPOTrainer and qdpo on the same pairs, on the CPU."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest

from tiny import QUICKSTART_RECIPE, qdpo


def test_against_trl_trains_both_on_the_same_tokens(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "cmp.json"
    res = qdpo("bench", QUICKSTART_RECIPE, "--against", "trl", "--steps", "2", "--warmup", "1",
               "--prompt-len", "8-16", "--response-len", "4-12", "train.pairs_per_step=4",
               "train.micro_batch_pairs=2", "--json", out)
    assert res.returncode == 0, res.stderr
    trl_row, qdpo_row = json.loads(out.read_text())
    assert trl_row["extra"]["tool"].startswith("trl ") and "tool" not in qdpo_row["extra"]
    assert trl_row["layout"] == "padded" and trl_row["reference"] == "online"
    assert trl_row["steps_timed"] == qdpo_row["steps_timed"] == 1
    # the same pairs, tokens counted the same way (TRL's from its attention masks)
    assert trl_row["extra"]["tokens"] == qdpo_row["extra"]["tokens"] > 0
    assert 0 < trl_row["padding_fraction"] < 1 and trl_row["tokens_per_s"] > 0
    assert "against trl 1.16.0" in res.stdout and "end to end" in res.stdout


def test_against_another_tool_or_without_trl_says_what_to_do(monkeypatch):
    res = qdpo("bench", QUICKSTART_RECIPE, "--against", "axolotl")
    assert res.returncode != 0 and "only tool to compare with is trl" in res.stderr
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl -> ImportError
    res = qdpo("bench", QUICKSTART_RECIPE, "--against", "trl")
    assert res.returncode != 0 and "pip install 'qdpo[compare]'" in res.stderr
    assert "Traceback" not in res.stderr


def test_match_memory_gives_qdpo_the_budget_the_planner_keeps_within_trls_peak(
        tmp_path, monkeypatch):
    """On a GPU TRL's peak is measured; here it is set, and qdpo must run on the budget
    `qdpo plan`'s arithmetic keeps under it."""
    pytest.importorskip("trl")
    import qdpo.compare as compare
    from qdpo.bench import bench_config
    from qdpo.memory import GIB, Settings, Shape, tokens_under
    from qdpo.recipe import load_recipe

    measured = 0.01  # GiB: the quickstart model's static part is ~0.004
    monkeypatch.setattr(compare, "measures_memory", lambda: True)
    real = compare.trl_result
    monkeypatch.setattr(compare, "trl_result", lambda *a, **k: dataclasses.replace(
        real(*a, **k), peak_alloc_gib=measured))
    args = ("train.pairs_per_step=4", "train.micro_batch_pairs=2")
    out = tmp_path / "cmp.json"
    res = qdpo("bench", QUICKSTART_RECIPE, "--against", "trl", "--match-memory", "--steps", "2",
               "--warmup", "1", "--prompt-len", "8-16", "--response-len", "4-12", *args,
               "--json", out)
    assert res.returncode == 0, res.stderr
    recipe = load_recipe(QUICKSTART_RECIPE, list(args))
    expected = tokens_under(Shape.from_config(bench_config(recipe, None)),
                            Settings.from_recipe(recipe), measured * GIB)
    assert 0 < expected < 4096
    trl_row, qdpo_row = json.loads(out.read_text())
    assert qdpo_row["extra"]["max_tokens"] == expected
    assert f"train.max_tokens {expected:,}" in res.stdout and "within TRL's" in res.stdout

    measured = 0.001  # below what the model alone takes: no budget fits
    res = qdpo("bench", QUICKSTART_RECIPE, "--against", "trl", "--match-memory", "--steps", "2",
               "--warmup", "1", "--prompt-len", "8-16", "--response-len", "4-12", *args)
    assert res.returncode != 0 and "with its smallest micro-batch" in res.stderr
    assert "model.offload_activations=true" in res.stderr and "Traceback" not in res.stderr


def test_match_memory_needs_trls_measured_peak(monkeypatch):
    res = qdpo("bench", QUICKSTART_RECIPE, "--match-memory")
    assert res.returncode != 0 and "use it with --against trl" in res.stderr
    pytest.importorskip("trl")
    res = qdpo("bench", QUICKSTART_RECIPE, "--against", "trl", "--match-memory", "--steps", "2",
               "--warmup", "1", "--prompt-len", "8-16", "--response-len", "4-12",
               "train.pairs_per_step=2", "train.micro_batch_pairs=2")
    assert res.returncode != 0 and "only a CUDA device measures" in res.stderr
    assert "bench: TRL DPOTrainer" not in res.stdout + res.stderr  # refused before TRL ran
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("setting,message", [
    ("loss.type=simpo", "TRL's DPOTrainer has no 'simpo' loss"),
    ("loss.type=sft", "needs no reference"),
    ("train.micro_batch_pairs=3", "multiple of train.micro_batch_pairs"),
    ("loss.label_smoothing=0.1", "label smoothing only to the robust and exo_pair"),
])
def test_a_recipe_trl_would_run_differently_is_refused_before_anything_runs(setting, message):
    pytest.importorskip("trl")
    res = qdpo("bench", QUICKSTART_RECIPE, "--against", "trl", "train.pairs_per_step=4",
               "train.micro_batch_pairs=2", setting)
    assert res.returncode != 0 and message in res.stderr, res.stderr
    assert "bench: TRL DPOTrainer" not in res.stdout + res.stderr  # refused before it ran


def test_trl_gets_the_recipes_loss(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    import qdpo.compare as compare

    seen = {}
    real = compare._config
    monkeypatch.setattr(compare, "_config", lambda *a, **k: seen.setdefault("c", real(*a, **k)))
    res = qdpo("bench", QUICKSTART_RECIPE, "--against", "trl", "--steps", "2", "--warmup", "1",
               "--prompt-len", "8-16", "--response-len", "4-12", "train.pairs_per_step=2",
               "train.micro_batch_pairs=2", "loss.type=[ipo,sft]", "loss.weights=[1.0,0.5]",
               "loss.beta=0.3")
    assert res.returncode == 0, res.stderr
    c = seen["c"]
    assert list(c.loss_type) == ["ipo", "sft"] and list(c.loss_weights) == [1.0, 0.5]
    assert c.beta == 0.3


def test_trls_row_reports_model_flops_utilisation_on_a_known_gpu(monkeypatch):
    """TRL's MFU counts its real tokens with the reference forward, as qdpo's does; and a
    PCIe H100 is not taken for the faster SXM one."""
    import torch

    from qdpo.bench import bench_config, flops_per_token, peak_flops, synthetic_pairs
    from qdpo.compare import trl_result
    from qdpo.recipe import load_recipe

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 PCIe")
    assert peak_flops(torch.device("cuda")) == 756e12
    recipe = load_recipe(QUICKSTART_RECIPE, ["train.pairs_per_step=2", "train.micro_batch_pairs=2"])
    config = bench_config(recipe, None)
    pairs = synthetic_pairs(4, config.vocab_size, (10, 10), (5, 5), 0)  # 30 tokens a pair
    run = {"times": [2.0, 1.0], "tokens": [60, 60], "total_s": 3.0, "slots": 120,
           "peak_alloc_gib": None, "peak_reserved_gib": None, "version": "1.16.0"}
    row = trl_result(recipe, None, run, 1, config, pairs)
    assert row.mfu == pytest.approx(flops_per_token(config, 7.5, True) * 60 / 1.0 / 756e12)
    assert trl_result(recipe, None, run, 1).mfu is None  # no config: not claimed


def test_exo_pairs_zero_smoothing_reaches_trl_as_qdpo_reads_it():
    """qdpo's exo_pair reads label_smoothing 0 as 1e-3; TRL refuses 0 after building its
    model, so it gets the 1e-3 qdpo computes with."""
    from qdpo.compare import _label_smoothing
    from qdpo.recipe import load_recipe

    assert _label_smoothing(load_recipe(QUICKSTART_RECIPE, ["loss.type=exo_pair"])) == 1e-3
    assert _label_smoothing(load_recipe(QUICKSTART_RECIPE, ["loss.type=exo_pair",
                                                            "loss.label_smoothing=0.01"])) == 0.01
    assert _label_smoothing(load_recipe(QUICKSTART_RECIPE, [])) == 0.0
