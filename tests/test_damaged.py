"""Damaged checkpoints and metrics: detected, named, skipped; never a traceback.

One tiny quickstart run is trained per module (checkpoints at steps 2 and 4, then the final
adapter). Each case copies it, turns it back into a run killed after checkpoint 4 was written
(no summary, no final adapter), damages something and resumes with `--resume`. Where an intact
checkpoint is left, the resumed run must end with the adapter of the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from qdpo import checkpoint as ck
from tiny import QUICKSTART_RECIPE, qdpo, read_metrics

ARGS = ["train.max_steps=4", "output.save_every_steps=2", "eval.every_steps=0"]
ADAPTER = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("damaged") / "full"
    res = qdpo("train", QUICKSTART_RECIPE, *ARGS, "-o", run)
    assert res.returncode == 0, res.stderr
    assert [p.name for p in ck.list_checkpoints(run)] == ["step-0000002", "step-0000004"]
    return run


@pytest.fixture
def killed(trained, tmp_path):
    """A copy of the run as a kill just before its final adapter would have left it."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for name in ("summary.json", ADAPTER, "adapter_config.json"):
        (run / name).unlink()
    return run


def ckpt(run, step):
    return ck.checkpoint_path(run, step)


def resume(run, *extra):
    res = qdpo("train", QUICKSTART_RECIPE, *ARGS, *extra, "-o", run, "--resume")
    assert "Traceback" not in res.stderr and "bug in qdpo" not in res.stderr, res.stderr
    return res


def assert_finished_like(run, trained):
    wa, wb = load_file(str(trained / ADAPTER)), load_file(str(run / ADAPTER))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]


def truncate(f, keep=100):
    f.write_bytes(f.read_bytes()[:keep])


def zero(f):
    f.write_bytes(bytes(f.stat().st_size))


def flip_middle(f):
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x5A
    f.write_bytes(bytes(data))


DAMAGE = {
    "truncated_adapter": (lambda c: truncate(c / ADAPTER), ADAPTER, "truncated"),
    "zeroed_adapter": (lambda c: zero(c / ADAPTER), ADAPTER, "sha256 differs"),
    "byte_changed_mid_adapter": (lambda c: flip_middle(c / ADAPTER), ADAPTER, "sha256 differs"),
    "truncated_state_tensors": (lambda c: truncate(c / ck.STATE_TENSORS), ck.STATE_TENSORS,
                                "truncated"),
    "truncated_state_json": (lambda c: truncate(c / ck.STATE_JSON), ck.STATE_JSON, "truncated"),
    "missing_adapter": (lambda c: (c / ADAPTER).unlink(), ADAPTER, "missing"),
    "missing_metadata": (lambda c: (c / ck.META).unlink(), ck.META, "missing"),
    "unreadable_metadata": (lambda c: truncate(c / ck.META, 5), ck.META, "unreadable"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_an_intact_one(killed, trained, case):
    damage, name, why = DAMAGE[case]
    damage(ckpt(killed, 4))
    res = resume(killed)
    assert res.returncode == 0, res.stderr
    line = next(x for x in res.stderr.splitlines() if "step-0000004 is damaged" in x)
    assert f"step-0000004/{name}" in line and why in line, line
    assert "falling back to step-0000002" in res.stderr
    assert "resumed from" in res.stdout and "step-0000002" in res.stdout
    assert_finished_like(killed, trained)


def test_checkpoint_renamed_to_another_step_is_skipped(killed, trained):
    shutil.copytree(ckpt(killed, 2), ckpt(killed, 8))  # step-0000008 holding step 2
    res = resume(killed)
    assert res.returncode == 0, res.stderr
    assert "checkpoint.json says step 2, but the directory is named step-0000008" in res.stderr
    assert "falling back to step-0000004" in res.stderr
    assert_finished_like(killed, trained)


def test_trainer_state_step_disagreeing_is_skipped(killed, trained):
    """Even in a checkpoint without hashes, the trainer state must hold the directory's step."""
    c = ckpt(killed, 4)
    (c / ck.META).write_text(json.dumps({"step": 4}))
    tree = json.loads((c / ck.STATE_JSON).read_text())
    tree["trainer"]["step"] = 3
    (c / ck.STATE_JSON).write_text(json.dumps(tree))
    res = resume(killed)
    assert res.returncode == 0, res.stderr
    assert "trainer_state.json holds step 3, but checkpoint.json says step 4" in res.stderr
    assert "falling back to step-0000002" in res.stderr
    assert_finished_like(killed, trained)


def test_nothing_intact_stops_with_one_message(killed):
    truncate(ckpt(killed, 4) / ADAPTER)
    flip_middle(ckpt(killed, 2) / ck.STATE_TENSORS)
    res = resume(killed)
    assert res.returncode == 2
    assert f"step-0000004/{ADAPTER}" in res.stderr
    assert f"step-0000002/{ck.STATE_TENSORS}" in res.stderr
    assert "No intact checkpoint to resume" in res.stderr and "--overwrite" in res.stderr
    assert not (killed / ADAPTER).exists()


def test_damaged_checkpoint_named_on_the_command_line_is_refused(killed):
    zero(ckpt(killed, 4) / ADAPTER)
    res = qdpo("train", QUICKSTART_RECIPE, *ARGS, "-o", killed, "--resume", ckpt(killed, 4))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and "bug in qdpo" not in res.stderr
    assert "Cannot resume from damaged checkpoint" in res.stderr
    assert f"step-0000004/{ADAPTER}" in res.stderr


def test_stray_entries_in_checkpoints_are_ignored(killed, trained):
    shutil.copytree(ckpt(killed, 4), killed / "checkpoints" / "step-0000008 copy")
    (killed / "checkpoints" / "notes.txt").write_text("keep step 4")
    (killed / "checkpoints" / "step-x").mkdir()
    res = resume(killed)
    assert res.returncode == 0, res.stderr
    assert "ignoring" in res.stdout and "step-0000008 copy" in res.stdout
    assert "notes.txt" in res.stdout and "step-x" in res.stdout
    assert "damaged" not in res.stderr
    assert "resumed from" in res.stdout and "step-0000004" in res.stdout
    assert_finished_like(killed, trained)


def test_checkpoint_without_hashes_resumes_with_a_note(killed, trained):
    """Checkpoints written before hashes were recorded: accepted, said to be unverifiable."""
    for step in (2, 4):
        (ckpt(killed, step) / ck.META).write_text(json.dumps({"step": step}))
    res = resume(killed)
    assert res.returncode == 0, res.stderr
    assert "step-0000004 was written by an older qdpo without checksums" in res.stdout
    assert "damaged" not in res.stderr
    assert_finished_like(killed, trained)


def test_checkpoint_without_hashes_is_still_checked_for_cut_files(killed, trained):
    for step in (2, 4):
        (ckpt(killed, step) / ck.META).write_text(json.dumps({"step": step}))
    truncate(ckpt(killed, 4) / ADAPTER)
    res = resume(killed)
    assert res.returncode == 0, res.stderr
    assert f"step-0000004/{ADAPTER} is unreadable (SafetensorError" in res.stderr
    assert "falling back to step-0000002" in res.stderr
    assert_finished_like(killed, trained)


def test_checkpoint_of_another_lora_shape_stops_with_one_message(killed, tmp_path):
    other = tmp_path / "other"
    res = qdpo("train", QUICKSTART_RECIPE, "train.max_steps=1", "eval.every_steps=0",
               "lora.r=8", "lora.target_modules=[q_proj,v_proj]", "-o", other)
    assert res.returncode == 0, res.stderr
    res = qdpo("train", QUICKSTART_RECIPE, *ARGS, "-o", killed, "--resume", ckpt(other, 1))
    assert res.returncode == 2
    out = res.stderr
    assert "Traceback" not in out and "bug in qdpo" not in out and "size mismatch" not in out
    assert len([x for x in out.splitlines() if "does not fit" in x]) == 1, out
    assert "step-0000001" in out and "LoRA r=8 on q_proj, v_proj" in out
    assert "LoRA r=16 on " in out and "k_proj" in out


def test_damaged_metrics_lines_are_counted_and_skipped(killed, trained):
    f = killed / "metrics.jsonl"
    good = f.read_bytes()
    f.write_bytes(b'{"step": 1, "loss": \xff\xfe}\n' + good + b'[1, 2]\n'
                  + b'{"step": "3", "loss": 0.5}\n' + b'{"step": 9, "lo')  # last: cut by a kill
    res = resume(killed)
    assert res.returncode == 0, res.stderr
    lines = [x for x in res.stderr.splitlines() if "metrics.jsonl" in x]
    assert len(lines) == 1 and "3 damaged lines skipped" in lines[0], res.stderr
    assert_finished_like(killed, trained)  # and metrics.jsonl reads back cleanly


def test_temporaries_of_a_killed_save_are_removed_at_the_next_start(tmp_path):
    import subprocess
    import sys

    run = tmp_path / "run"
    assert qdpo("train", QUICKSTART_RECIPE, "train.max_steps=2", "-o", run).returncode == 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id that is gone, like the killed trainer's
    left = [run / "checkpoints" / f".step-0000004.tmp-{dead.pid}",
            run / f".final-adapter.tmp-{dead.pid}"]
    for p in left:
        p.mkdir()
        (p / "adapter_model.safetensors").write_bytes(b"\0" * 1000)
    alive = run / "checkpoints" / f".step-0000009.tmp-{os.getpid()}"  # a live process's
    alive.mkdir()
    res = qdpo("train", QUICKSTART_RECIPE, "train.max_steps=4", "-o", run, "--resume")
    assert res.returncode == 0, res.stderr
    assert "removed 2 temporary folder(s) of an earlier, killed save" in res.stdout
    assert not any(p.exists() for p in left) and alive.exists()


def test_a_disk_nearly_full_is_a_warning_before_the_save(tmp_path, monkeypatch, caplog):
    from collections import namedtuple

    run = tmp_path / "run"
    assert qdpo("train", QUICKSTART_RECIPE, "train.max_steps=2", "-o", run).returncode == 0
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with caplog.at_level("WARNING", logger="qdpo"):
        ck.warn_if_low_on_space(run, keep_last=2)
    assert "the next checkpoint needs about" in caplog.text and "output.keep_last" in caplog.text
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 0, 10**12))
    caplog.clear()
    ck.warn_if_low_on_space(run, keep_last=2)
    assert caplog.text == ""


def test_eval_of_a_run_still_training_uses_its_newest_intact_checkpoint(killed):
    data = QUICKSTART_RECIPE.parent / "quickstart" / "eval.jsonl"
    res = qdpo("eval", killed, "--data", data, "--max-pairs", "4")
    assert res.returncode == 0, res.stderr
    assert "has no final adapter yet" in res.stdout and "step-0000004" in res.stdout
    (ckpt(killed, 4) / ADAPTER).write_bytes(b"\0" * 64)  # the newest is damaged: the one before
    res = qdpo("eval", killed, "--data", data, "--max-pairs", "4")
    assert res.returncode == 0, res.stderr
    assert "using its newest checkpoint, step-0000002" in res.stdout
    for step in (2, 4):
        (ckpt(killed, step) / ADAPTER).write_bytes(b"\0" * 64)
    res = qdpo("eval", killed, "--data", data)
    assert res.returncode == 2 and "without a final adapter or an intact checkpoint" in res.stderr


def test_two_processes_racing_on_one_cache_key_read_only_whole_entries(tmp_path):
    """Tokenization and reference caches are written atomically: two runs filling the same
    keys at once both finish, and neither reads the other's half-written file."""
    import os
    import subprocess
    import sys

    from tiny import REPO

    env = dict(os.environ, QDPO_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "qdpo", "train", str(QUICKSTART_RECIPE), "train.max_steps=2"]
    runs = [subprocess.Popen(cmd + ["-o", str(tmp_path / f"run{i}")], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]
    outs = [p.communicate(timeout=600) for p in runs]
    for p, (out, err) in zip(runs, outs):
        assert p.returncode == 0, err[-2000:]
    a, b = (load_file(str(tmp_path / f"run{i}" / ADAPTER)) for i in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same data and reference in both
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if ".tmp-" in p.name]
    assert not leftovers


# ------------------------------------------------------- the final adapter, and a checkpoint


def _flat(text):
    return " ".join(text.split())


def test_damaged_final_adapter_is_named_by_every_command(trained, tmp_path):
    """Bytes changed in the middle of the final adapter pass its safetensors header: the
    manifest written with it (size and sha256 of each file) names it instead of numbers."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    flip_middle(run / ADAPTER)
    data = QUICKSTART_RECIPE.parent / "quickstart" / "eval.jsonl"
    for cmd in (["eval", run, "--data", data, "--max-pairs", "4"],
                ["merge", run, "--out", tmp_path / "merged"],
                ["export", run, "--format", "peft", "--out", tmp_path / "exported"],
                ["chat", run]):
        res = qdpo(*cmd, stdin="Hello\n/exit\n")
        err = _flat(res.stderr)
        assert res.returncode == 2, (cmd, res.stdout, res.stderr)
        assert "Traceback" not in err and "bug in qdpo" not in err
        assert f"The final adapter in '{run}' is damaged" in err, err
        assert f"{run / ADAPTER} changed since it was saved (its sha256 differs)" in err, err
        assert f"'{ckpt(run, 4)}'" in err, err  # what to use instead
    assert not (tmp_path / "merged").exists() and not (tmp_path / "exported").exists()
    from qdpo.rundir import FINAL_MANIFEST

    manifest = json.loads((run / FINAL_MANIFEST).read_text())["files"]
    assert {ADAPTER, "adapter_config.json"} <= set(manifest) and "README.md" not in manifest


def test_damaged_checkpoint_named_directly_is_refused_by_eval(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    flip_middle(ckpt(run, 4) / ADAPTER)
    data = QUICKSTART_RECIPE.parent / "quickstart" / "eval.jsonl"
    res = qdpo("eval", ckpt(run, 4), "--data", data, "--max-pairs", "4")
    err = _flat(res.stderr)
    assert res.returncode == 2, res.stderr
    assert f"The checkpoint '{ckpt(run, 4)}' is damaged" in err, err
    assert f"step-0000004/{ADAPTER} changed since it was saved" in err, err
    assert f"'{ckpt(run, 2)}'" in err, err
    res = qdpo("eval", ckpt(run, 2), "--data", data, "--max-pairs", "4")
    assert res.returncode == 0, res.stderr


def test_truncated_final_adapter_and_unreadable_manifest_are_named(trained, tmp_path):
    from qdpo.rundir import FINAL_MANIFEST

    data = QUICKSTART_RECIPE.parent / "quickstart" / "eval.jsonl"
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    truncate(run / "tokenizer.json")
    res = qdpo("eval", run, "--data", data, "--max-pairs", "4")
    assert res.returncode == 2 and "tokenizer.json is 100 bytes" in _flat(res.stderr)
    assert "truncated" in res.stderr
    shutil.copy2(trained / "tokenizer.json", run / "tokenizer.json")
    truncate(run / FINAL_MANIFEST, 5)
    res = qdpo("eval", run, "--data", data, "--max-pairs", "4")
    assert res.returncode == 2 and f"{FINAL_MANIFEST} is unreadable" in _flat(res.stderr)


def test_plain_adapter_without_a_manifest_still_loads(trained, tmp_path):
    adapter = tmp_path / "plain"
    adapter.mkdir()
    for f in ("adapter_config.json", ADAPTER, "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja"):
        shutil.copy2(trained / f, adapter / f)
    data = QUICKSTART_RECIPE.parent / "quickstart" / "eval.jsonl"
    res = qdpo("eval", adapter, "--data", data, "--max-pairs", "4")
    assert res.returncode == 0, res.stderr
    zero(adapter / ADAPTER)  # without a record, the header is what can be checked
    res = qdpo("eval", adapter, "--data", data, "--max-pairs", "4")
    assert res.returncode == 2 and "is damaged" in res.stderr
