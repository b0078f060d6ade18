"""Operational behaviour: reference cache reuse, bench, GGUF through the CLI, `qdpo data`,
skipped non-finite steps, a full disk."""

from __future__ import annotations

import errno
import json
import re

import pytest
from typer.testing import CliRunner

from qdpo.cli import app
from tiny import read_metrics
from tiny import QUICKSTART_RECIPE, qdpo, quickstart_recipe

SMALL = ["train.max_steps=3", "train.pairs_per_step=8", "train.micro_batch_pairs=8",
         "data.max_pairs=64", "eval.max_pairs=16"]


def invoke(*args):
    res = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return res


def test_reference_precomputed_once_then_reused(tmp_path):
    a = invoke("train", QUICKSTART_RECIPE, *SMALL, "-o", tmp_path / "a")
    assert a.exit_code == 0, a.output
    assert "computed in" in a.output and "cached for later runs" in a.output
    # a beta sweep on the same data: same reference numbers, no reference pass
    b = invoke("train", QUICKSTART_RECIPE, *SMALL, "loss.beta=0.3", "-o", tmp_path / "b")
    assert b.exit_code == 0, b.output
    assert "reused from cache" in b.output and "computed in" not in b.output
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in "ab"]
    assert [x["reference_reused"] for x in summaries] == [False, True]
    assert summaries[0]["tokens_per_s_average"] > 0
    ra = [r for r in read_metrics(tmp_path / "a") if "logps/ref_chosen" in r]
    rb = [r for r in read_metrics(tmp_path / "b") if "logps/ref_chosen" in r]
    assert ra[0]["logps/ref_chosen"] == rb[0]["logps/ref_chosen"]
    # online reference gives the same numbers (the cache is not stale or shifted)
    c = invoke("train", QUICKSTART_RECIPE, *SMALL, "train.reference=online", "-o",
               tmp_path / "c")
    assert c.exit_code == 0, c.output
    rc = [r for r in read_metrics(tmp_path / "c") if "logps/ref_chosen" in r]
    assert rc[0]["logps/ref_chosen"] == pytest.approx(ra[0]["logps/ref_chosen"], abs=1e-3)
    assert rc[-1]["loss"] == pytest.approx(ra[-1]["loss"], abs=1e-4)


def test_layouts_train_identically(tmp_path):
    losses = {}
    for layout in ("padded", "packed", "shared_prefix"):
        res = invoke("train", QUICKSTART_RECIPE, *SMALL, f"train.layout={layout}",
                     "train.max_tokens=900", "-o", tmp_path / layout)
        assert res.exit_code == 0, res.output
        assert f"layout: {layout}" in res.output
        losses[layout] = [r["loss"] for r in read_metrics(tmp_path / layout) if "loss" in r]
    for layout in ("packed", "shared_prefix"):
        assert losses[layout] == pytest.approx(losses["padded"], abs=1e-4)


def test_bench_cli_reports_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    res = invoke("bench", QUICKSTART_RECIPE, "train.pairs_per_step=4",
                 "train.micro_batch_pairs=4", "--random-weights", "--steps", "3", "--warmup",
                 "1", "--prompt-len", "8-24", "--response-len", "4-16", "--layouts",
                 "padded,shared_prefix", "--json", out)
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())
    assert [r["layout"] for r in rows] == ["padded", "shared_prefix"]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["e2e_tokens_per_s"] > 0 and r["step_time_s"] > 0
        assert r["reference"] == "precompute" and r["reference_s"] > 0
        assert r["steps_timed"] == 2
    assert rows[0]["padding_fraction"] > rows[1]["padding_fraction"]
    assert "qdpo bench" in res.output
    bad = qdpo("bench", QUICKSTART_RECIPE, "--shape", "llama-9000")
    assert bad.returncode == 2 and "Built-in shapes: llama-3.1-8b" in bad.stderr


def test_data_command(tmp_path):
    res = qdpo("data", QUICKSTART_RECIPE, "-n", "2")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.count("⟦chosen⟧") == 2 and out.count("⟦rejected⟧") == 2
    for word in ("p50", "p95", "max", "prompt", "chosen", "rejected", "tokens per epoch",
                 "384"):
        assert word in out


def test_data_command_marks_where_pairs_were_cut(tmp_path):
    args = ["data", QUICKSTART_RECIPE, "-n", "1", "data.max_prompt_length=12",
            "data.max_length=30"]
    for cache in ("--no-cache", None):  # tokenized now, then read back from the cache
        res = qdpo(*args, *([cache] if cache else []))
        assert res.returncode == 0, res.stderr
        out = res.stdout
        assert out.count("row ") >= 3 and "cut 3 of the first 3" in out
        # the template's head, then the mark, then the newest content
        first = out[out.index("cut 1 of the first 3"):]
        assert re.search(r"<\|begin_of_text\|><\|im_start\|>user\n⟦… \d+ tokens cut …⟧", first)
        assert re.search(r"⟦chosen: … its last \d+ tokens? cut \(data.max_length\)⟧", out)
        # the rendered example is marked too, not only the cut's own block
        example = out[out.index("example 1:"):out.index("cut 1 of the first 3")]
        assert re.search(r"im_start\|>user\n⟦… \d+ tokens cut …⟧", example), example
    plain = qdpo("data", QUICKSTART_RECIPE, "-n", "1")
    assert "⟦…" not in plain.stdout and "cut 1 of" not in plain.stdout


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ops") / "run"
    res = invoke("train", QUICKSTART_RECIPE, *SMALL, "-o", run)
    assert res.exit_code == 0, res.output
    return run


def test_gguf_exports_through_cli(small_run, tmp_path):
    gguf = pytest.importorskip("gguf")
    res = qdpo("export", small_run, "--format", "gguf", "--out", tmp_path / "m.gguf",
               "--outtype", "q8_0")
    assert res.returncode == 0, res.stderr
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "blk.0.attn_q.weight", "output.weight"} <= names
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
    assert "tokenizer.chat_template" in reader.fields
    res = qdpo("export", small_run, "--format", "gguf-lora", "--out", tmp_path / "a.gguf")
    assert res.returncode == 0, res.stderr
    reader = gguf.GGUFReader(str(tmp_path / "a.gguf"))
    assert any(t.name.endswith(".lora_a") for t in reader.tensors)
    res = qdpo("export", small_run, "--format", "onnx", "--out", tmp_path / "x")
    assert res.returncode == 2 and "peft, gguf, gguf-lora" in res.stderr
    # a LoRA adapter is never quantized: q8_0 is refused, not silently written as f16
    res = qdpo("export", small_run, "--format", "gguf-lora", "--out", tmp_path / "q.gguf",
               "--outtype", "q8_0")
    assert res.returncode == 2 and "--outtype f16" in res.stderr
    assert not (tmp_path / "q.gguf").exists()


def test_nonfinite_steps_skipped_then_stop(tmp_path, monkeypatch):
    import qdpo.train as train_mod
    from qdpo.errors import QdpoError

    from qdpo.losses import Objective

    real = Objective.__call__
    calls = {"n": 0}

    def flaky(*a, **k):
        out = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 2 or calls["n"] >= 4:  # step 2 bad once, then bad from step 4 on
            out.losses = out.losses * float("nan")
        return out

    monkeypatch.setattr(Objective, "__call__", flaky)
    r = quickstart_recipe(tmp_path, "train.max_steps=20", "train.pairs_per_step=8",
                          "train.micro_batch_pairs=8", "output.save_every_steps=1",
                          "data.max_pairs=64", "eval.max_pairs=8", "eval.every_steps=0")
    with pytest.raises(QdpoError, match="5 optimizer steps in a row") as e:
        train_mod.train(r)
    assert "checkpoint" in str(e.value)
    logged = [x["step"] for x in read_metrics(tmp_path / "run") if "loss" in x]
    assert logged == [1, 3]  # step 2 skipped, steps 4-8 skipped, then the stop
    assert (tmp_path / "run" / "checkpoints" / "step-0000003").exists()


def test_a_run_whose_steps_were_all_skipped_fails(tmp_path, monkeypatch):
    """Fewer steps than the in-a-row limit, all non-finite: nothing trained, so no adapter and
    no success (it used to save the untrained adapter and exit 0)."""
    import qdpo.train as train_mod
    from qdpo.errors import QdpoError

    monkeypatch.setattr(train_mod, "train_step", lambda ctx, data, idx: None)
    r = quickstart_recipe(tmp_path, "train.max_steps=3", "data.max_pairs=64", "eval.max_pairs=8")
    with pytest.raises(QdpoError, match="non-finite"):
        train_mod.train(r)
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


def _full_disk_errors():
    from safetensors import SafetensorError

    return [OSError(errno.ENOSPC, "No space left on device"),  # Python's own writes
            SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                            'message: "No space left on device" })'),
            RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 6848 vs "
                         "6736")]  # torch's zip writer


@pytest.mark.parametrize("error", _full_disk_errors(), ids=["OSError", "safetensors", "torch"])
def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch, error):
    import qdpo.checkpoint as ck
    import qdpo.train as train_mod
    from qdpo.errors import QdpoError

    import safetensors.torch as st

    real_save = st.save_file

    def full_disk(obj, f, *a, **k):  # room for the first checkpoint only
        if "step-0000001" not in str(f) and "checkpoints" in str(f):
            raise error
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(st, "save_file", full_disk)
    r = quickstart_recipe(tmp_path, "train.max_steps=4", "train.pairs_per_step=8",
                          "train.micro_batch_pairs=8", "output.save_every_steps=1",
                          "data.max_pairs=64", "eval.max_pairs=8")
    with pytest.raises(QdpoError, match="Disk full") as e:
        train_mod.train(r)
    assert "previous checkpoint (step-0000001) is intact" in str(e.value)
    assert "A checkpoint takes about" in str(e.value) and "output.keep_last" in str(e.value)
    assert "qdpo's cache" in str(e.value)
    ckpts = ck.list_checkpoints(tmp_path / "run")
    assert [p.name for p in ckpts] == ["step-0000001"]
    assert ck.read_state(ckpts[0])["trainer"]["step"] == 1
    assert not list((tmp_path / "run" / "checkpoints").glob(".*tmp*"))


def test_out_of_memory_is_one_message(tmp_path, monkeypatch):
    import torch

    import qdpo.train as train_mod
    from qdpo.errors import QdpoError

    real = train_mod.train_step

    def oom_at_third(ctx, data, idx):
        if ctx.scheduler.last_epoch == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(ctx, data, idx)

    monkeypatch.setattr(train_mod, "train_step", oom_at_third)
    r = quickstart_recipe(tmp_path, *SMALL, "train.max_steps=5", "output.save_every_steps=1")
    with pytest.raises(QdpoError) as e:
        train_mod.train(r)
    msg = str(e.value)
    for part in ("Out of GPU memory at step 3", "max_length 128", "micro_batch_pairs",
                 "--resume"):
        assert part in msg
    assert (tmp_path / "run" / "checkpoints" / "step-0000002").exists()


@pytest.mark.parametrize("error", _full_disk_errors()[1:], ids=["safetensors", "torch"])
def test_a_full_disk_anywhere_is_one_message_not_a_bug(error):
    from qdpo.cli import _disk_problem

    said = _disk_problem(error)
    assert said and said.startswith("Cannot write: the disk is full") and "--resume" in said
    assert _disk_problem(RuntimeError("shape mismatch")) is None  # a bug stays a bug


def test_eval_says_which_pairs_the_run_trained_on_whatever_file_they_come_from(tmp_path):
    from tiny import qdpo

    run = tmp_path / "run"
    assert qdpo("train", QUICKSTART_RECIPE, "train.max_steps=1", "eval.every_steps=0",
                "-o", run).returncode == 0
    data = QUICKSTART_RECIPE.parent / "quickstart"
    train_rows = (data / "train.jsonl").read_text().splitlines()[:5]
    eval_rows = (data / "eval.jsonl").read_text().splitlines()[:3]
    mixed = tmp_path / "mine.jsonl"  # another file, sharing 5 pairs with the training data
    mixed.write_text("\n".join(eval_rows + train_rows) + "\n")
    res = qdpo("eval", run, "--data", mixed)
    assert res.returncode == 0, res.stderr
    assert "5 of 8 eval pairs are in this run's training data" in res.stderr
    clean = qdpo("eval", run, "--data", data / "eval.jsonl", "--max-pairs", "4")
    assert clean.returncode == 0 and "training data" not in clean.stderr


def test_no_third_party_progress_bars(tmp_path):
    """datasets ("Generating train split") and the hub client draw their own bars; qdpo's
    display is the only one. A real process with a cold cache: the suite's conftest silences
    datasets in-process, which would hide a regression."""
    import os
    import subprocess
    import sys

    import pandas as pd

    rows = [json.loads(x) for x in
            (QUICKSTART_RECIPE.parent / "quickstart" / "train.jsonl").read_text().splitlines()]
    pd.DataFrame([{k: json.dumps(v) for k, v in r.items()} for r in rows[:40]]).to_parquet(
        tmp_path / "t.parquet")  # parquet goes through `datasets`
    env = dict(os.environ, QDPO_CACHE=str(tmp_path / "cache"), HF_DATASETS_CACHE=str(
        tmp_path / "hf"), TERM="xterm", COLUMNS="120")
    res = subprocess.run([sys.executable, "-m", "qdpo", "data", str(QUICKSTART_RECIPE),
                          f"data.train={tmp_path / 't.parquet'}", "-n", "1"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout + res.stderr
    assert "40 pairs from 40 rows" in out
    for bar in ("Generating train split", "it/s]", "examples/s]", "Loading weights"):
        assert bar not in out, bar
