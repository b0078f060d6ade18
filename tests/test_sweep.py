"""`qdpo sweep`: the grid, the sweep directory and its record, sharing, resuming, failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qdpo.errors import QdpoError, RecipeError, RunDirError
from qdpo.sweep import (SWEEP_FILE, Grid, parse_grid, rank, reference_sharing, run_names,
                        run_sweep, split_values)
from tiny import QUICKSTART_RECIPE, qdpo

FAST = ["train.max_steps=2", "train.pairs_per_step=4", "train.micro_batch_pairs=4",
        "eval.max_pairs=8"]


def _record(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / SWEEP_FILE).read_text())


def _fake_train(calls: list, fail_beta: str | None = None, interrupt: bool = False):
    """A stand-in for qdpo.train.train that records its calls and trains nothing."""
    from qdpo.train import TrainResult

    def fake(recipe, resume=None, overwrite=False, **kw):
        calls.append((recipe.output.dir, recipe.loss.beta, resume))
        if fail_beta is not None and recipe.loss.beta == float(fail_beta):
            raise QdpoError("CUDA out of memory at step 1 (pretend)")
        ev = {"rewards/accuracies": 0.5 + recipe.loss.beta, "rewards/margins": 1.0,
              "loss": 0.5}
        run = Path(recipe.output.dir)
        if not interrupt:  # what a finished run leaves
            run.mkdir(parents=True, exist_ok=True)
            (run / "adapter_config.json").write_text("{}")
            (run / "summary.json").write_text(json.dumps({"steps": 1, "eval": ev}))
        return TrainResult(run, 1, ev, {"loss": 0.6}, interrupted=interrupt)

    return fake


# ---------------------------------------------------------------------------------------
# The grid: parsing, names, validation, sharing
# ---------------------------------------------------------------------------------------

def test_grid_is_the_product_in_order_with_fixed_overrides():
    g = parse_grid(["loss.beta=0.05,0.1,0.3", "train.max_steps=2",
                    "train.learning_rate=5e-6,1e-5"])
    assert g.keys == ["loss.beta", "train.learning_rate"]
    assert g.fixed == ["train.max_steps=2"]
    points = g.points()
    assert len(points) == 6
    assert points[:2] == [{"loss.beta": "0.05", "train.learning_rate": "5e-6"},
                          {"loss.beta": "0.05", "train.learning_rate": "1e-5"}]
    assert g.overrides(points[0]) == ["train.max_steps=2", "loss.beta=0.05",
                                      "train.learning_rate=5e-6"]
    assert run_names(g)[0] == "beta=0.05_learning_rate=5e-6"
    assert len(set(run_names(g))) == 6


def test_commas_inside_brackets_quotes_or_escaped_do_not_split():
    assert split_values("[sigmoid,sft],sigmoid") == ["[sigmoid,sft]", "sigmoid"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]
    assert split_values(r"a\,b") == ["a,b"]
    g = parse_grid(["loss.type=[sigmoid,sft]", "data.system_prompt=Be kind\\, always"])
    assert g.keys == [] and g.fixed == ["loss.type=[sigmoid,sft]",
                                        "data.system_prompt=Be kind, always"]


def test_names_are_filesystem_safe_and_unique():
    g = parse_grid(["data.train=a/x.jsonl,b/x.jsonl", "data.max_pairs=4,8",
                    "eval.max_pairs=2,4"])
    names = run_names(g)  # a leaf two keys share ('max_pairs') is written in full
    assert names[0] == "train=a-x.jsonl_data.max_pairs=4_eval.max_pairs=2"
    assert all("/" not in n for n in names) and len(set(names)) == 8
    clash = Grid(["loss.beta"], [["a/b", "a b"]])
    assert run_names(clash) == ["beta=a-b-1", "beta=a-b-2"]


@pytest.mark.parametrize("args, words", [
    (["loss.beta"], "key.sub=value"), (["loss.beta=0.1,0.2", "loss.beta=0.3,0.4"], "twice"),
    (["output.dir=a,b"], "--out"), (["loss.beta=0.1,"], "empty value"),
    (["loss.beta=0.1,0.1"], "twice"),
])
def test_bad_grid_arguments(args, words):
    with pytest.raises(RecipeError, match=words):
        parse_grid(args)


def test_a_bad_value_is_refused_before_anything_trains(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr("qdpo.train.train", _fake_train(calls))
    with pytest.raises(RecipeError, match="loss.beta=oops.*'loss.beta'"):
        run_sweep(QUICKSTART_RECIPE, ["loss.beta=0.1,oops"], out=tmp_path / "s")
    res = qdpo("sweep", QUICKSTART_RECIPE, "train.learning_rate=1e-5,fast", "--out",
               tmp_path / "s")
    assert res.returncode == 2 and "train.learning_rate" in res.stderr
    with pytest.raises(RecipeError, match="Nothing to sweep"):
        run_sweep(QUICKSTART_RECIPE, ["loss.beta=0.1"], out=tmp_path / "s")
    assert calls == [] and not (tmp_path / "s").exists()


def test_reference_is_shared_unless_a_swept_key_changes_it(tmp_path):
    from qdpo.sweep import grid_recipes

    def sharing(*args):
        g = parse_grid(list(args))
        return reference_sharing(g, grid_recipes(QUICKSTART_RECIPE, g, tmp_path))

    assert sharing("loss.beta=0.1,0.3", "train.learning_rate=1e-5,2e-5")[0] is True
    shared, msg = sharing("loss.beta=0.1,0.3", "train.max_steps=2,4")
    assert shared is True and "train.max_steps" in msg
    for key in ("data.max_length=100,128", "train.seed=1,2", "model.quantization=nf4,fp4",
                "eval.max_pairs=4,8"):
        shared, msg = sharing(key)
        assert shared is False and key.split("=")[0] in msg
    assert sharing("loss.type=simpo,orpo")[0] is None
    assert sharing("loss.beta=0.1,0.3", "train.reference=online")[0] is None


def test_ranking_by_eval_then_train_loss():
    from qdpo.sweep import SweepRun

    def run(name, acc=None, margin=0.0, loss=0.5, status="done"):
        ev = {} if acc is None else {"rewards/accuracies": acc, "rewards/margins": margin,
                                     "loss": loss}
        return SweepRun(name, name, {}, status, eval=ev, train={"loss": loss})

    ranked, by = rank([run("a", 0.8, 1.0), run("b", 0.9, 0.1), run("c", 0.9, 0.2),
                       run("d", 0.9, 0.2, loss=0.4), run("e", 1.0, status="failed")])
    assert [r.name for r in ranked] == ["d", "c", "b", "a"] and "accuracies" in by
    ranked, by = rank([run("a", loss=0.7), run("b", loss=0.3)])
    assert [r.name for r in ranked] == ["b", "a"] and "train loss" in by


def test_a_beta_sweep_ranks_by_the_margin_without_beta():
    from qdpo.sweep import SweepRun

    def run(name, beta, log_ratio):  # rewards/margins = beta * log-ratio margin
        ev = {"rewards/accuracies": 1.0, "rewards/margins": beta * log_ratio, "loss": 0.5,
              "logps/chosen": -10.0 + log_ratio, "logps/ref_chosen": -10.0,
              "logps/rejected": -12.0, "logps/ref_rejected": -12.0}
        return SweepRun(name, name, {}, "done", eval=ev, train={"loss": 0.5})

    # by reward margin beta 0.3 would win (0.3 * 0.5 = 0.15 against 0.05 * 2.0 = 0.10), yet
    # beta 0.05 moved the policy four times as far from the reference
    ranked, by = rank([run("beta=0.3", 0.3, 0.5), run("beta=0.05", 0.05, 2.0)])
    assert [r.name for r in ranked] == ["beta=0.05", "beta=0.3"] and "log-ratio" in by


# ---------------------------------------------------------------------------------------
# Whole sweeps
# ---------------------------------------------------------------------------------------

def test_sweep_end_to_end_then_refuse_then_resume(tmp_path):
    out = tmp_path / "sweep"
    res = qdpo("sweep", QUICKSTART_RECIPE, "loss.beta=0.05,0.3", "train.learning_rate=2e-3",
               *FAST, "--out", out)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "reference: shared" in res.stdout and "best run: " in res.stdout
    rec = _record(out)
    names = ["beta=0.05", "beta=0.3"]
    assert [r["name"] for r in rec["runs"]] == names
    assert all(r["status"] == "done" for r in rec["runs"]) and rec["reference_shared"] is True
    for n in names:
        assert (out / n / "adapter_config.json").exists()
    assert json.loads((out / "beta=0.3" / "summary.json").read_text())["reference_reused"]
    assert rec["runs"][1]["reference_reused"] is True
    keyed = {r["name"]: (r["eval"]["rewards/accuracies"], r["eval"]["rewards/margins"],
                         -r["eval"]["loss"]) for r in rec["runs"]}
    assert rec["ranking"] == sorted(names, key=keyed.get, reverse=True)
    assert rec["best"] == rec["ranking"][0] and "accuracies" in rec["ranked_by"]

    again = qdpo("sweep", QUICKSTART_RECIPE, "loss.beta=0.05,0.3", "train.learning_rate=2e-3",
                 *FAST, "--out", out)
    assert again.returncode == 2 and "--resume" in again.stderr and "--overwrite" in again.stderr

    first = (out / "beta=0.05" / "summary.json").stat().st_mtime_ns
    (out / "beta=0.3" / "summary.json").unlink()
    res = qdpo("sweep", QUICKSTART_RECIPE, "loss.beta=0.05,0.3", "train.learning_rate=2e-3",
               *FAST, "--out", out, "--resume")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 already done" in res.stdout and "run 1/1: beta=0.3" in res.stdout
    assert (out / "beta=0.05" / "summary.json").stat().st_mtime_ns == first
    assert (out / "beta=0.3" / "summary.json").exists()
    assert all(r["status"] == "done" for r in _record(out)["runs"])


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr("qdpo.train.train", _fake_train(calls, fail_beta="0.05"))
    result = run_sweep(QUICKSTART_RECIPE, ["loss.beta=0.05,0.3", *FAST], out=tmp_path / "s")
    assert len(calls) == 2
    failed, done = result.runs
    assert failed.status == "failed" and "out of memory" in failed.error
    assert done.status == "done" and result.best is done
    rec = _record(tmp_path / "s")
    assert [r["status"] for r in rec["runs"]] == ["failed", "done"]
    assert rec["best"] == "beta=0.3" and "out of memory" in rec["runs"][0]["error"]

    calls.clear()  # --resume (no grid: the recorded one) tries the failed point again, only it
    monkeypatch.setattr("qdpo.train.train", _fake_train(calls))
    result = run_sweep(QUICKSTART_RECIPE, [], out=tmp_path / "s", resume=True)
    assert [c[1] for c in calls] == [0.05]
    assert [r.status for r in result.runs] == ["done", "done"]
    with pytest.raises(RunDirError, match="another grid"):
        run_sweep(QUICKSTART_RECIPE, ["loss.beta=0.05,0.5", *FAST], out=tmp_path / "s",
                  resume=True)


def test_an_interrupt_stops_the_sweep_after_the_current_run(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr("qdpo.train.train", _fake_train(calls, interrupt=True))
    res = qdpo("sweep", QUICKSTART_RECIPE, "loss.beta=0.05,0.3", *FAST, "--out",
               tmp_path / "s")
    assert res.returncode == 130 and len(calls) == 1
    assert [r["status"] for r in _record(tmp_path / "s")["runs"]] == ["pending", "pending"]
    assert _record(tmp_path / "s")["runs"][0]["interrupted"] is True


def test_overwrite_removes_only_a_sweep(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr("qdpo.train.train", _fake_train(calls))
    out = tmp_path / "s"
    args = ["loss.beta=0.05,0.3", *FAST]
    run_sweep(QUICKSTART_RECIPE, args, out=out)
    (out / "beta=0.3" / "metrics.jsonl").write_text("")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="notes.txt"):
        run_sweep(QUICKSTART_RECIPE, args, out=out, overwrite=True)
    (out / "notes.txt").unlink()
    run_sweep(QUICKSTART_RECIPE, args, out=out, overwrite=True)
    assert not (out / "beta=0.3" / "metrics.jsonl").exists() and len(calls) == 4
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.jsonl").write_text("{}")
    with pytest.raises(RunDirError, match="no sweep.json"):
        run_sweep(QUICKSTART_RECIPE, args, out=other, overwrite=True)
