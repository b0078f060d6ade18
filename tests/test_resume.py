"""Runs that never lose work: SIGKILL part way, resume, same result as never stopping."""

from __future__ import annotations

import json
import os
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
