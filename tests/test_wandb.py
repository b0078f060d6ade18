"""Weights & Biases logging (`output.wandb`), in wandb's offline mode: no network."""

from __future__ import annotations

import json
import pytest

from tiny import QUICKSTART_RECIPE, qdpo


def test_metrics_go_to_wandb_with_the_recipe_as_config(tmp_path, monkeypatch):
    calls = {"log": [], "finish": 0}

    class FakeRun:
        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            calls["finish"] += 1

    def init(**kwargs):
        calls["init"] = kwargs
        return FakeRun()

    wandb = pytest.importorskip("wandb")
    monkeypatch.setattr(wandb, "init", init)
    run = tmp_path / "run"
    res = qdpo("train", QUICKSTART_RECIPE, "train.max_steps=3", "eval.every_steps=2",
               "output.wandb=qdpo-tests", "-o", run)
    assert res.returncode == 0, res.stderr
    init_args = calls["init"]
    assert init_args["project"] == "qdpo-tests" and init_args["name"] == "run"
    assert init_args["dir"] == str(run) and init_args["config"]["loss"]["beta"] == 0.1
    steps = [step for step, values in calls["log"] if "loss" in values]
    assert steps == [1, 2, 3] and calls["finish"] == 1
    assert any("eval/rewards/accuracies" in values for _, values in calls["log"])
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    first = next(v for s, v in calls["log"] if s == 1 and "loss" in v)
    assert first["loss"] == next(x["loss"] for x in logged if x.get("step") == 1)


def test_offline_wandb_writes_its_run_into_the_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    res = qdpo("train", QUICKSTART_RECIPE, "train.max_steps=2", "eval.every_steps=0",
               "output.wandb=qdpo-tests", "-o", run)
    assert res.returncode == 0, res.stderr
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1 and files[0].stat().st_size > 0
