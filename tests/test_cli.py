"""Whole runs through the command line, as a user types them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tiny import QUICKSTART_RECIPE, qdpo, read_metrics


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    res = qdpo("train", QUICKSTART_RECIPE, "train.max_steps=12", "eval.every_steps=4",
               "train.micro_batch_pairs=8", "-o", run)
    assert res.returncode == 0, res.stdout + res.stderr
    return run, res


def test_train_leaves_a_peft_adapter_and_learns(trained):
    run, res = trained
    for f in ("adapter_config.json", "adapter_model.safetensors", "recipe.yaml", "run.json",
              "metrics.jsonl", "summary.json", "tokenizer.json"):
        assert (run / f).exists(), f
    rows = read_metrics(run)
    train = [r for r in rows if "rewards/accuracies" in r]
    evals = [r for r in rows if "eval/rewards/accuracies" in r]
    assert [r["step"] for r in train] == list(range(1, 13))
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                "logps/rejected", "lr", "grad_norm", "tokens_per_s"):
        assert key in train[0]
    assert train[0]["rewards/accuracies"] < 0.6 < 0.9 <= train[-1]["rewards/accuracies"]
    assert [e["step"] for e in evals] == [4, 8, 12]
    assert evals[-1]["eval/rewards/margins"] > evals[0]["eval/rewards/margins"] > 0
    assert evals[-1]["eval/rewards/accuracies"] >= 0.9
    assert "held-out reward accuracy" in res.stdout and "clearly above chance" in res.stdout


def test_adapter_loads_with_plain_peft(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, _ = trained
    info = json.loads((run / "run.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(info["base_model"])
    tok = AutoTokenizer.from_pretrained(run)
    ids = tok("What do you think about the night sky?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, str(run))(input_ids=ids).logits
    assert (tuned - before).abs().max() > 1e-3


def test_existing_run_dir_refused(trained):
    run, _ = trained
    res = qdpo("train", QUICKSTART_RECIPE, "train.max_steps=1", "-o", run)
    assert res.returncode == 2
    assert "already holds a qdpo run" in res.stderr and "--overwrite" in res.stderr
    assert "Traceback" not in res.stderr
    assert (run / "adapter_model.safetensors").exists()


def test_bad_recipe_is_one_clear_message(tmp_path):
    res = qdpo("train", QUICKSTART_RECIPE, "train.learnig_rate=1e-4", "-o", tmp_path / "x")
    assert res.returncode == 2
    assert "train.learning_rate" in res.stderr and "Traceback" not in res.stderr
    res = qdpo("train", tmp_path / "nope.yaml")
    assert res.returncode == 2 and "does not exist" in res.stderr
    res = qdpo("--debug", "train", tmp_path / "nope.yaml", subprocess=True)
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_missing_data_file(tmp_path):
    res = qdpo("train", QUICKSTART_RECIPE, f"data.train={tmp_path / 'missing.jsonl'}",
               "-o", tmp_path / "x")
    assert res.returncode == 2 and "missing.jsonl" in res.stderr
    assert "Traceback" not in res.stderr


def test_version_help_init(tmp_path):
    from qdpo import __version__

    # the real entry point, in a fresh interpreter
    assert qdpo("--version", subprocess=True).stdout.strip() == f"qdpo {__version__}"
    out = qdpo("train", "--help").stdout
    for opt in ("--resume", "--overwrite", "--output", "overrides"):
        assert opt in out
    target = tmp_path / "r.yaml"
    res = qdpo("init", target)
    assert res.returncode == 0 and target.exists()
    from qdpo.recipe import load_recipe

    r = load_recipe(target)
    assert r.model.name_or_path == "meta-llama/Llama-3.1-8B-Instruct"
    assert qdpo("init", target).returncode == 2  # no silent overwrite


def test_overwrite_never_deletes_a_project_folder(tmp_path):
    import shutil

    project = tmp_path / "proj"
    shutil.copytree(QUICKSTART_RECIPE.parent / "quickstart", project / "quickstart")
    shutil.copy(QUICKSTART_RECIPE, project / "recipe.yaml")
    (project / "notes.txt").write_text("mine")
    res = qdpo("train", project / "recipe.yaml", "train.max_steps=1", "-o", project,
               "--overwrite")
    assert res.returncode == 2 and "Refusing to --overwrite" in res.stderr
    assert (project / "notes.txt").read_text() == "mine"
    assert (project / "quickstart" / "train.jsonl").exists()


def test_interrupted_train_prints_the_exact_resume_command(tmp_path, monkeypatch):
    import qdpo.train as train_mod

    def interrupted(recipe, **kwargs):
        return train_mod.TrainResult(run_dir=Path(recipe.output.dir), steps=3, final_eval={},
                                     last_train={}, interrupted=True)

    monkeypatch.setattr(train_mod, "train", interrupted)
    run = tmp_path / "my run"
    res = qdpo("train", QUICKSTART_RECIPE, "loss.beta=0.2", "-o", run)
    assert res.returncode == 130
    assert (f"resume with: qdpo train {QUICKSTART_RECIPE} loss.beta=0.2 -o '{run}' --resume"
            in res.stdout)
    res = qdpo("train", QUICKSTART_RECIPE, "--overwrite")  # the recipe's own output.dir
    assert (f"resume with: qdpo train {QUICKSTART_RECIPE} -o runs/quickstart --resume"
            in res.stdout), res.stdout


def test_help_has_no_bool_placeholders_and_init_takes_overwrite(tmp_path):
    for command in ("train", "init", "export", "chat"):
        res = qdpo(command, "--help")
        assert res.returncode == 0 and "<bool>" not in res.stdout, command
    target = tmp_path / "r.yaml"
    assert qdpo("init", target).returncode == 0
    again = qdpo("init", target)
    assert again.returncode != 0 and "--overwrite" in again.stderr
    assert qdpo("init", target, "--overwrite").returncode == 0


def test_did_you_mean_knows_other_tools_names():
    res = qdpo("train", QUICKSTART_RECIPE, "lora.rank=8")
    assert res.returncode != 0 and "Did you mean 'lora.r'?" in res.stderr
    res = qdpo("train", QUICKSTART_RECIPE, "train.optimizer=adam8bit")
    assert res.returncode != 0 and "did you mean 'adamw_8bit'?" in res.stderr


def test_a_model_path_that_matches_no_folder_says_where_it_looked(tmp_path):
    res = qdpo("train", QUICKSTART_RECIPE, "model.name_or_path=./models/missing",
               "model.random_init=false", "-o", tmp_path / "run")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "is a path, and no folder is there" in res.stderr
    assert str(QUICKSTART_RECIPE.parent / "models" / "missing") in res.stderr
    # org/name in form, but `quickstart/` is a folder beside the recipe: a typo, not a hub id
    typo = qdpo("data", QUICKSTART_RECIPE, "model.name_or_path=quickstart/modl")
    assert typo.returncode != 0 and "is a path, and no folder is there" in typo.stderr
    assert "huggingface.co" not in typo.stderr


def test_init_writes_a_recipe_that_works_as_written(tmp_path):
    from qdpo.recipe import load_recipe

    target = tmp_path / "r.yaml"
    assert qdpo("init", target).returncode == 0
    r = load_recipe(target)
    assert [(s.path, s.split) for s in r.data.train] == [
        ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs")]
    assert [s.split for s in r.eval.data] == ["test_prefs"]
    assert r.train.optimizer == "paged_adamw_8bit" and r.output.save_every_steps > 0
    other = tmp_path / "o.yaml"
    assert qdpo("init", other, "--data", "my/pairs").returncode == 0
    r = load_recipe(other)
    assert r.data.train[0].split == "train" and r.eval.split_fraction > 0 and not r.eval.data


def test_overwrite_removes_only_what_qdpo_wrote(tmp_path):
    foreign = tmp_path / "home"
    (foreign / ".ssh").mkdir(parents=True)
    (foreign / ".ssh" / "id_rsa").write_text("secret")
    (foreign / "run.json").write_text('{"tool": "someone else"}')  # another tool's run.json
    res = qdpo("train", QUICKSTART_RECIPE, "train.max_steps=1", "-o", foreign, "--overwrite")
    assert res.returncode != 0 and "not a qdpo run" in res.stderr
    assert (foreign / ".ssh" / "id_rsa").read_text() == "secret"

    run = tmp_path / "run"
    assert qdpo("train", QUICKSTART_RECIPE, "train.max_steps=1", "eval.every_steps=0", "-o",
                run).returncode == 0
    (run / "notes.txt").write_text("mine")
    res = qdpo("train", QUICKSTART_RECIPE, "train.max_steps=1", "-o", run, "--overwrite")
    assert res.returncode != 0 and "notes.txt" in res.stderr
    assert (run / "notes.txt").exists() and (run / "run.json").exists()
    (run / "notes.txt").unlink()
    assert qdpo("train", QUICKSTART_RECIPE, "train.max_steps=1", "eval.every_steps=0", "-o",
                run, "--overwrite").returncode == 0


def test_output_dir_with_a_tilde_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    res = qdpo("train", QUICKSTART_RECIPE, "train.max_steps=1", "eval.every_steps=0",
               "output.dir=~/runs/qs")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "runs" / "qs" / "run.json").exists() and not Path("~").exists()
    # where the shell leaves ~ alone: quoted, or after an option's =
    assert qdpo("export", tmp_path / "runs" / "qs", "-f", "peft", "--out=~/exp").returncode == 0
    assert qdpo("report", tmp_path / "runs" / "qs", "-o", "~/r.html").returncode == 0
    assert (tmp_path / "exp" / "adapter_config.json").exists()
    assert (tmp_path / "r.html").exists() and not Path("~").exists()
    assert qdpo("report", tmp_path / "runs" / "qs", "-o~/r2.html").returncode == 0  # -o~/x
    assert (tmp_path / "r2.html").exists() and not Path("~").exists()


@pytest.mark.parametrize("code,says", [(30, "read-only"), (28, "disk is full"),
                                       (13, "permission denied")])
def test_a_file_system_refusing_writes_is_one_message(tmp_path, monkeypatch, code, says):
    import qdpo.rundir as rundir

    def refuse(self, *args, **kwargs):
        raise OSError(code, "refused", str(self.path))

    monkeypatch.setattr(rundir.RunDir, "prepare_for_training", refuse)
    res = qdpo("train", QUICKSTART_RECIPE, "-o", tmp_path / "run")
    assert res.returncode == 2 and says in res.stderr and str(tmp_path / "run") in res.stderr
    assert "bug in qdpo" not in res.stderr and "Traceback" not in res.stderr


def test_a_cache_that_cannot_be_written_costs_the_cache_not_the_run(tmp_path, monkeypatch):
    import errno

    import qdpo.data.pipeline as pipeline
    import qdpo.reference as reference

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "cache"))

    monkeypatch.setattr(pipeline, "write_cache", read_only)
    monkeypatch.setattr(reference, "save_cached", read_only)
    monkeypatch.setenv("QDPO_CACHE", str(tmp_path / "cache"))
    res = qdpo("train", QUICKSTART_RECIPE, "train.max_steps=1", "eval.every_steps=0", "-o",
               tmp_path / "run")
    assert res.returncode == 0, res.stderr
    assert "could not cache the tokenized data" in res.stderr
    assert "could not cache the reference log-probs" in res.stderr
    assert "cached for later runs" not in res.stdout


def test_the_cli_starts_with_a_typer_that_lacks_display_type_rich():
    from qdpo.cli import _flags_without_type

    class OlderTyperOption:  # typer versions before display_type_rich (the GPU image's)
        pass

    _flags_without_type(OlderTyperOption)
    assert not hasattr(OlderTyperOption, "display_type_rich")


@pytest.mark.parametrize("args, fragment", [
    (["data", QUICKSTART_RECIPE, "-n", "-1"], "-n"),
    (["generate", "RUN", "--prompts", "p.jsonl", "--out", "o.jsonl", "--batch-size", "-1"],
     "--batch-size"),
    (["generate", "RUN", "--prompts", "p.jsonl", "--out", "o.jsonl", "--batch-size", "0"],
     "--batch-size"),
    (["eval", "RUN", "--data", "x.jsonl", "--max-pairs", "-1"], "--max-pairs"),
])
def test_out_of_range_options_stop_before_any_work(args, fragment):
    res = qdpo(*args)
    assert res.returncode == 2 and fragment in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("option", [["--temperature", "nan"], ["--temperature", "inf"],
                                    ["--repetition-penalty", "0"], ["--top-k", "-1"]])
def test_sampling_options_that_cannot_sample_are_refused(tmp_path, option):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    res = qdpo("generate", tmp_path, "--prompts", prompts, "--out", tmp_path / "o.jsonl",
               *option)
    assert res.returncode == 2 and "Sampling options" in res.stderr, res.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_an_interrupt_outside_the_training_loop_says_how_to_go_on(tmp_path, monkeypatch):
    import importlib

    def interrupted(*args, **kwargs):  # Ctrl-C (or SIGTERM) while loading, before any step
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module("qdpo.train"), "train", interrupted)
    res = qdpo("train", QUICKSTART_RECIPE, "-o", tmp_path / "run", "--overwrite")
    assert res.returncode == 130
    assert "interrupted; checkpoints already written are kept" in res.stderr
    assert f"qdpo train {QUICKSTART_RECIPE} -o {tmp_path / 'run'} --resume" in res.stderr
    assert "--overwrite" not in res.stderr  # going on must not wipe the run


def test_sigterm_stops_a_command_like_ctrl_c():
    import signal

    import qdpo.cli  # noqa: F401  (installs the handler)

    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGTERM)


def test_eval_names_a_missing_data_file_before_loading_the_model(tmp_path):
    res = qdpo("eval", tmp_path / "no-run", "--data", tmp_path / "missing.jsonl")
    assert res.returncode == 2 and f"--data '{tmp_path / 'missing.jsonl'}' does not exist" \
        in res.stderr


def test_help_texts_show_their_brackets():
    """Help is rendered with rich markup: an unescaped [x] in a help text is eaten
    (`pip install 'qdpo[compare]'` showed as `pip install 'qdpo'`)."""
    import re

    import typer.main

    from qdpo.cli import app

    for name, command in typer.main.get_command(app).commands.items():
        for text in [command.help or ""] + [getattr(p, "help", "") or "" for p in command.params]:
            assert not re.search(r"(?<!\\)\[", text), (name, text)
    res = qdpo("bench", "--help")
    assert "qdpo[compare]" in " ".join(res.stdout.split())


def test_bench_json_can_be_written_again(tmp_path):
    from qdpo.cli import _check_output

    out = tmp_path / "b.json"
    out.write_text("[]")
    _check_output(out, "--json", folder=False)  # an earlier result is replaced, not refused
    with pytest.raises(Exception, match="is a folder"):
        _check_output(tmp_path, "--json", folder=False)
    with pytest.raises(Exception, match="does not exist"):
        _check_output(tmp_path / "no" / "b.json", "--json", folder=False)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_while_starting_is_one_line_not_a_traceback(tmp_path, signame):
    """Real signals at moments spread over start-up (imports of the CLI and torch, recipe,
    data): whatever was running, one message and no traceback."""
    import signal
    import subprocess
    import sys
    import time

    def importing_torch(pid):  # its shared library is mapped: the import has begun
        try:
            return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            return False

    for delay in (0.0, 0.3, 1.0):  # after torch's import began
        p = subprocess.Popen([sys.executable, "-m", "qdpo", "train", str(QUICKSTART_RECIPE),
                              "-o", str(tmp_path / "run"), "--overwrite"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not importing_torch(p.pid) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        p.send_signal(getattr(signal, signame))
        out, err = p.communicate(timeout=120)
        assert "Traceback" not in err, (delay, err[-2000:])
        if p.returncode != 0:  # (a run can finish before a late signal: fine)
            assert p.returncode == 130 and "error: interrupted" in err, (delay, p.returncode, err)


def test_a_device_this_machine_lacks_is_said_before_any_work(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("for machines without a GPU")
    res = qdpo("merge", tmp_path / "no-run", "--out", tmp_path / "m", "--device", "cuda")
    assert res.returncode == 2
    assert "--device cuda: this machine has 0 CUDA GPU(s)" in res.stderr
    assert "name_or_path" not in res.stderr and not (tmp_path / "m").exists()
