"""Data parallel training under torchrun: two CPU processes (gloo) end with the adapter one
process makes, share the reference cache with one-process runs, and resume each other's
checkpoints."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from qdpo.distributed import Ranks, share
from tiny import QUICKSTART_RECIPE, REPO, qdpo, read_metrics

STEPS = ["train.max_steps=4", "eval.every_steps=2"]  # the quickstart has LoRA dropout 0


def torchrun(*args, ranks=2):
    """`torchrun --standalone --nproc-per-node 2 -m qdpo ...` on the CPU (gloo)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={ranks}", "-m", "qdpo", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600,
                          check=False)


def adapter(run):
    return load_file(str(run / "adapter_model.safetensors"))


def assert_same_adapter(a, b):
    wa, wb = adapter(a), adapter(b)
    assert wa.keys() == wb.keys() and len(wa) == 28
    assert max(w.abs().max().item() for w in wa.values()) > 0.01  # it trained
    for k in wa:  # the same sums in another order: float rounding only
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=2e-5)


def test_two_ranks_train_the_adapter_of_one_and_share_its_reference_cache(tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("QDPO_CACHE", str(tmp_path / "cache"))  # cold: the ranks compute it
    two = torchrun("train", QUICKSTART_RECIPE, *STEPS, "-o", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "for 64 pairs computed" in two.stdout  # the reference pass, split across the ranks
    assert two.stdout.count("qdpo run summary") == 1  # rank 0 talks for the job
    one = qdpo("train", QUICKSTART_RECIPE, *STEPS, "-o", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    assert "train log-probs reused from cache" in one.stdout  # the cache the ranks wrote
    assert_same_adapter(tmp_path / "one", tmp_path / "two")
    m1, m2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [m["step"] for m in m2] == [m["step"] for m in m1]  # written once, by rank 0
    for a, b in zip(m1, m2):  # the step's metrics are over all its pairs, whatever the ranks
        for k in ("loss", "rewards/accuracies", "tokens", "eval/loss", "eval/pairs"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4), k
    margins = json.loads((tmp_path / "two" / "eval_margins.json").read_text())
    assert margins["pairs"] == 64 == len(margins["margins"])


def test_a_checkpoint_of_one_process_resumes_on_two_ranks(tmp_path):
    run = tmp_path / "run"
    flat = ["train.lr_scheduler=constant", "train.warmup_ratio=0"]  # the same lr at 2 or 4 steps
    first = qdpo("train", QUICKSTART_RECIPE, *flat, "train.max_steps=2", "-o", run)
    assert first.returncode == 0, first.stderr
    more = torchrun("train", QUICKSTART_RECIPE, *flat, "train.max_steps=4", "-o", run, "--resume")
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resumed from" in more.stdout
    straight = qdpo("train", QUICKSTART_RECIPE, *flat, "train.max_steps=4",
                    "-o", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    assert_same_adapter(run, tmp_path / "straight")


def test_bench_and_eval_under_torchrun(tmp_path):
    bench = torchrun("bench", QUICKSTART_RECIPE, "--steps", "2", "--warmup", "1",
                     "--json", tmp_path / "bench.json")
    assert bench.returncode == 0, bench.stderr[-3000:]
    row, = json.loads((tmp_path / "bench.json").read_text())
    assert row["extra"]["ranks"] == 2
    assert row["extra"]["tokens_per_s_per_rank"] == pytest.approx(row["tokens_per_s"] / 2)
    assert bench.stdout.count("qdpo bench") == 1  # one table, from rank 0
    run = tmp_path / "run"
    assert qdpo("train", QUICKSTART_RECIPE, "train.max_steps=2", "-o", run).returncode == 0
    data = REPO / "recipes" / "quickstart" / "eval.jsonl"
    one = qdpo("eval", run, "--data", data, "--json")
    two = torchrun("eval", run, "--data", data, "--json")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = json.loads(one.stdout), json.loads(two.stdout)  # one JSON document: rank 0's
    assert b["pairs"] == a["pairs"] == 64
    for k in ("rewards/accuracies", "rewards/margins", "loss"):
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k


def test_pairs_are_shared_out_by_tokens():
    ids, costs = list(range(10)), [50, 10, 40, 10, 30, 20, 5, 5, 60, 25]
    parts = [share(ids, costs, Ranks(r, 3, r)) for r in range(3)]
    assert sorted(i for p in parts for i in p) == ids  # each pair once
    loads = [sum(costs[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(costs) // 2
    assert parts == [share(ids, costs, Ranks(r, 3, r)) for r in range(3)]  # same on every rank
    assert share(ids, costs, Ranks()) == ids


def test_gpus_without_the_gpus_is_one_message():
    res = qdpo("train", QUICKSTART_RECIPE, "--gpus", "2")
    assert res.returncode == 2
    assert "--gpus 2: this machine has 0 CUDA GPU(s)" in res.stderr


def test_sharded_weights_train_and_resume_as_one_process(tmp_path, monkeypatch):
    """train.fsdp: 4-bit base and adapters sharded over 2 ranks (FSDP2), 5 pairs per step in
    micro-batches of 1 (3 on one rank, 2 on the other: the idle one keeps pace), a cold
    reference pass; checkpoints written whole resume on any layout."""
    monkeypatch.setenv("QDPO_CACHE", str(tmp_path / "cache"))
    common = ["train.lr_scheduler=constant", "train.warmup_ratio=0", "train.pairs_per_step=5",
              "train.micro_batch_pairs=1", "eval.every_steps=2"]
    fsdp = "train.fsdp=true"
    sharded = torchrun("train", QUICKSTART_RECIPE, *common, fsdp, "train.max_steps=4",
                       "-o", tmp_path / "sharded")
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert "2 decoder layers sharded across 2 ranks" in sharded.stdout
    held, total = map(float, re.search(r"each holds ([\d.]+) of the model's ([\d.]+) MiB",
                                       sharded.stdout).groups())
    assert held < 0.9 * total  # the layers' halves (embeddings and head stay whole)
    assert "for 20 pairs computed" in sharded.stdout  # the reference pass, sharded too
    straight = qdpo("train", QUICKSTART_RECIPE, *common, "train.max_steps=4",
                    "-o", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    assert_same_adapter(tmp_path / "straight", tmp_path / "sharded")
    m1, m2 = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "sharded")
    def losses(metrics):
        return [m.get("loss", m.get("eval/loss")) for m in metrics]

    assert losses(m2) == pytest.approx(losses(m1), rel=1e-4)

    # a one-process checkpoint resumed sharded, and a sharded one resumed by one process
    one_then_two, two_then_one = tmp_path / "a", tmp_path / "b"
    assert qdpo("train", QUICKSTART_RECIPE, *common, "train.max_steps=2",
                "-o", one_then_two).returncode == 0
    more = torchrun("train", QUICKSTART_RECIPE, *common, fsdp, "train.max_steps=4",
                    "-o", one_then_two, "--resume")
    assert more.returncode == 0 and "resumed from" in more.stdout, more.stderr[-3000:]
    first = torchrun("train", QUICKSTART_RECIPE, *common, fsdp, "train.max_steps=2",
                     "-o", two_then_one)
    assert first.returncode == 0, first.stderr[-3000:]
    more = qdpo("train", QUICKSTART_RECIPE, *common, "train.max_steps=4", "-o", two_then_one,
                "--resume")
    assert more.returncode == 0 and "resumed from" in more.stdout, more.stderr
    assert_same_adapter(tmp_path / "straight", one_then_two)
    assert_same_adapter(tmp_path / "straight", two_then_one)


def test_sharding_needs_adamw():
    res = qdpo("train", QUICKSTART_RECIPE, "train.fsdp=true", "train.optimizer=adamw_8bit")
    assert res.returncode != 0
    assert "train.optimizer" in res.stderr and "must be adamw" in res.stderr
