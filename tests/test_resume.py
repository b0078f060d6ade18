"""Runs that never lose work: SIGKILL part way, resume, same result as never stopping."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import torch
from safetensors.torch import load_file

from tiny import read_metrics
from tiny import QUICKSTART_RECIPE, REPO, qdpo

ARGS = ["train.max_steps=10", "output.save_every_steps=2", "output.keep_last=2",
        "train.pairs_per_step=8", "train.micro_batch_pairs=4", "eval.every_steps=0",
        "lora.dropout=0.1"]  # dropout makes the RNG state matter

KILLER = """
import os, signal, sys
from qdpo.recipe import load_recipe
from qdpo.train import train
r = load_recipe(sys.argv[1], sys.argv[2:])
def on_step(step, metrics):
    if step == 5:  # checkpoint 4 is on disk, step 5 is logged, then the power goes out
        os.kill(os.getpid(), signal.SIGKILL)
train(r, on_step=on_step)
"""


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    res = qdpo("train", QUICKSTART_RECIPE, *ARGS, "-o", full)
    assert res.returncode == 0, res.stderr

    proc = subprocess.run([sys.executable, "-c", KILLER, str(QUICKSTART_RECIPE), *ARGS,
                           f"output.dir={killed}"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (killed / "adapter_model.safetensors").exists()
    ckpts = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert ckpts == ["step-0000002", "step-0000004"]  # keep_last bounds disk use
    assert max(r["step"] for r in read_metrics(killed)) == 5

    res = qdpo("train", QUICKSTART_RECIPE, *ARGS, "-o", killed, "--resume")
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stdout and "step-0000004" in res.stdout

    a = {r["step"]: r for r in read_metrics(full) if "loss" in r}
    b = {r["step"]: r for r in read_metrics(killed) if "loss" in r}
    assert sorted(b) == list(range(1, 11))  # step 5 logged once, not twice
    for step in range(5, 11):
        assert abs(a[step]["loss"] - b[step]["loss"]) < 1e-5, step
        assert abs(a[step]["rewards/margins"] - b[step]["rewards/margins"]) < 1e-4, step
    wa = load_file(str(full / "adapter_model.safetensors"))
    wb = load_file(str(killed / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


def test_resume_refuses_changed_recipe_but_allows_more_steps(tmp_path):
    run = tmp_path / "r"
    base = ["train.max_steps=2", "train.pairs_per_step=8", "train.micro_batch_pairs=8",
            "eval.every_steps=0"]
    assert qdpo("train", QUICKSTART_RECIPE, *base, "-o", run).returncode == 0
    res = qdpo("train", QUICKSTART_RECIPE, *base, "loss.beta=0.5", "lora.r=4", "-o", run,
               "--resume")
    assert res.returncode == 2
    assert "loss.beta" in res.stderr and "lora.r" in res.stderr
    res = qdpo("train", QUICKSTART_RECIPE, "train.max_steps=3", "train.pairs_per_step=8",
               "train.micro_batch_pairs=8", "eval.every_steps=0", "-o", run, "--resume")
    assert res.returncode == 0, res.stderr
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert steps == [1, 2, 3]
    assert json.loads((run / "summary.json").read_text())["steps"] == 3


def test_sigterm_saves_a_checkpoint(tmp_path):
    run = tmp_path / "t"
    script = KILLER.replace("os.kill(os.getpid(), signal.SIGKILL)",
                            "os.kill(os.getpid(), signal.SIGTERM)").replace("step == 5",
                                                                           "step == 3")
    proc = subprocess.run([sys.executable, "-c", script, str(QUICKSTART_RECIPE), *ARGS,
                           f"output.dir={run}"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert "interrupt" in proc.stderr + proc.stdout
    assert "send SIGTERM again to quit now" in proc.stderr + proc.stdout  # not "Ctrl-C"
    assert (run / "checkpoints" / "step-0000003").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["interrupted"] and summary["steps"] == 3


def test_resume_a_finished_run_only_with_more_steps(tmp_path):
    from tiny import qdpo

    run = tmp_path / "run"
    args = [QUICKSTART_RECIPE, "train.max_steps=2", "eval.every_steps=0", "-o", run]
    assert qdpo("train", *args).returncode == 0
    again = qdpo("train", *args, "--resume")
    assert again.returncode != 0 and "finished run (2 steps)" in again.stderr
    assert "train.max_steps=4" in again.stderr
    more = qdpo("train", QUICKSTART_RECIPE, "train.max_steps=3", "eval.every_steps=0", "-o", run,
                "--resume")
    assert more.returncode == 0, more.stderr
    assert "resume: train.max_steps 2 -> 3" in more.stdout
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    recipe = (run / "recipe.yaml").read_text()
    fewer = qdpo("train", QUICKSTART_RECIPE, "train.max_steps=2", "eval.every_steps=0", "-o", run,
                 "--resume")  # would train nothing and record a 2-step run of a 3-step adapter
    assert fewer.returncode != 0 and "is at step 3" in fewer.stderr
    assert "more than 3 steps" in fewer.stderr
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    assert (run / "recipe.yaml").read_text() == recipe


def test_resume_where_there_is_no_run_says_it_starts_fresh(tmp_path):
    from tiny import qdpo

    res = qdpo("train", QUICKSTART_RECIPE, "train.max_steps=1", "eval.every_steps=0", "-o",
               tmp_path / "new", "--resume")
    assert res.returncode == 0, res.stderr
    assert "nothing to resume" in res.stdout and "starting a new run" in res.stdout


def test_a_second_train_in_a_running_runs_directory_is_refused(tmp_path):
    """A real second process holds the directory's lock; this one must not start there."""
    from tiny import qdpo

    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from qdpo.rundir import RunDir; "
         "RunDir(sys.argv[1])._lock(); print('locked', flush=True); time.sleep(60)", str(run)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        res = qdpo("train", QUICKSTART_RECIPE, "train.max_steps=1", "-o", run, "--overwrite")
        assert res.returncode != 0 and "Another qdpo train is running" in res.stderr
        assert str(holder.pid) in res.stderr
    finally:
        holder.kill()
        holder.wait()
    res = qdpo("train", QUICKSTART_RECIPE, "train.max_steps=1", "eval.every_steps=0", "-o", run)
    assert res.returncode == 0, res.stderr  # the lock died with its process


SHORT = ["train.max_steps=4", "output.save_every_steps=2", "train.pairs_per_step=8",
         "train.micro_batch_pairs=8", "eval.every_steps=0"]


def test_resume_before_the_first_checkpoint_starts_again_from_step_0(tmp_path):
    """Killed after step 1 of a run whose first checkpoint is at step 2 (as in the first
    steps, or the reference pass): --resume starts it again there, the old log cleared."""
    run = tmp_path / "run"
    script = KILLER.replace("step == 5", "step == 1")
    proc = subprocess.run([sys.executable, "-c", script, str(QUICKSTART_RECIPE), *SHORT,
                           f"output.dir={run}"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    assert [r["step"] for r in read_metrics(run)] == [1]
    (run / "tensorboard").mkdir()  # what the stopped attempt logged elsewhere
    (run / "notes.txt").write_text("mine")

    res = qdpo("train", QUICKSTART_RECIPE, *SHORT, "loss.beta=0.5", "-o", run, "--resume")
    assert res.returncode == 2 and "loss.beta" in res.stderr
    assert "before its first checkpoint" in res.stderr
    assert [r["step"] for r in read_metrics(run)] == [1]  # nothing touched

    res = qdpo("train", QUICKSTART_RECIPE, *SHORT, "-o", run, "--resume")
    assert res.returncode == 0, res.stderr
    out = " ".join(res.stdout.split())
    assert "holds no checkpoint (it stopped after 1 logged step, before its first checkpoint)" \
        in out and "starting it again from step 0" in out, out
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in read_metrics(run) if "eval/loss" in r] == [4]
    assert not (run / "tensorboard").exists() and (run / "notes.txt").read_text() == "mine"
    assert json.loads((run / "summary.json").read_text())["steps"] == 4


def test_a_folder_holding_only_its_recipe_is_resumed_or_overwritten(tmp_path):
    """Killed between writing recipe.yaml and run.json: neither refused by --resume nor by
    --overwrite; a recipe.yaml that is not qdpo's still is."""
    run = tmp_path / "run"
    args = [QUICKSTART_RECIPE, "train.max_steps=1", "eval.every_steps=0", "-o", run]

    def only_the_recipe():
        for p in run.iterdir():
            if p.name != "recipe.yaml":
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    assert qdpo("train", *args).returncode == 0
    only_the_recipe()
    res = qdpo("train", *args)
    assert res.returncode == 2 and "already holds a qdpo run" in res.stderr
    res = qdpo("train", *args, "--resume")
    assert res.returncode == 0, res.stderr
    assert "starting it again from step 0" in " ".join(res.stdout.split())
    assert (run / "run.json").exists() and (run / "adapter_model.safetensors").exists()
    only_the_recipe()
    res = qdpo("train", *args, "--overwrite")
    assert res.returncode == 0, res.stderr
    only_the_recipe()
    (run / "recipe.yaml").write_text("model: {name_or_path: x}\n")  # another tool's file
    res = qdpo("train", *args, "--overwrite")
    assert res.returncode == 2 and "not a qdpo run directory" in res.stderr


def test_resume_from_the_final_checkpoint_logs_the_final_eval_once(tmp_path):
    """Killed after the final checkpoint, before the final adapter: the resumed run only
    evaluates again, and its eval record is not written twice."""
    run = tmp_path / "run"
    args = [QUICKSTART_RECIPE, "train.max_steps=2", "eval.every_steps=0", "-o", run]
    assert qdpo("train", *args).returncode == 0
    for name in ("summary.json", "adapter_model.safetensors", "adapter_config.json"):
        (run / name).unlink()
    res = qdpo("train", *args, "--resume")
    assert res.returncode == 0, res.stderr
    assert "step-0000002" in res.stdout
    records = read_metrics(run)
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert [r["step"] for r in records if "eval/loss" in r] == [2]


def test_truncate_metrics_at_the_last_step_drops_its_eval(tmp_path):
    from qdpo.rundir import RunDir

    lines = [{"step": 1, "loss": 1.0}, {"step": 2, "eval/loss": 0.9}, {"step": 2, "loss": 0.8},
             {"step": 3, "loss": 0.7}]
    text = "".join(json.dumps(r) + "\n" for r in lines)
    (tmp_path / "metrics.jsonl").write_text(text)
    RunDir(tmp_path).truncate_metrics(2, total=4)  # a periodic eval: not done again
    assert read_metrics(tmp_path) == lines[:3]
    (tmp_path / "metrics.jsonl").write_text(text)
    RunDir(tmp_path).truncate_metrics(2, total=2)  # the final eval: done again
    assert read_metrics(tmp_path) == [lines[0], lines[2]]


def test_resume_changes_are_spelt_as_the_recipe_spells_them(caplog):
    from qdpo.recipe import load_recipe
    from qdpo.rundir import _say_resume_changes

    old = load_recipe(QUICKSTART_RECIPE, ["train.max_steps=null"])
    new = load_recipe(QUICKSTART_RECIPE, ["train.max_steps=10"])
    with caplog.at_level("INFO", logger="qdpo"):
        _say_resume_changes(old, new)
    assert "resume: train.max_steps null -> 10" in caplog.text and "None" not in caplog.text


def test_resume_into_a_folder_of_other_files_says_there_is_nothing_to_resume(tmp_path):
    from tiny import qdpo

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "recipe.yaml").write_text("my own notes: true\n")
    res = qdpo("train", QUICKSTART_RECIPE, "-o", mine, "--resume")
    assert res.returncode != 0 and "Nothing to resume" in res.stderr
    assert "recipe.yaml" in res.stderr and "--resume to continue" not in res.stderr
    assert (mine / "recipe.yaml").read_text() == "my own notes: true\n"
