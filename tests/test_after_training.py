"""merge, export, chat, generate and eval on a real (tiny) trained run, through the CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch

from qdpo.errors import RunDirError

from tiny import QUICKSTART, QUICKSTART_RECIPE, qdpo


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("after") / "run"
    res = qdpo("train", QUICKSTART_RECIPE, "train.max_steps=8", "-o", run)
    assert res.returncode == 0, res.stderr
    return run


def _ids():
    return torch.tensor([[0, 5, 9, 33, 100, 7, 250, 3]])


@pytest.mark.parametrize("from_nf4", [False, True])
def test_merge_equals_base_plus_adapter(run, tmp_path, from_nf4):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qdpo.model import load_trained
    from qdpo.rundir import open_trained

    out = tmp_path / "merged"
    args = ["merge", run, "--out", out, "--dtype", "fp32"] + (["--from-nf4"] if from_nf4 else [])
    res = qdpo(*args)
    assert res.returncode == 0, res.stderr
    assert "need about" in res.stdout  # memory estimate before the work
    for f in ("config.json", "model.safetensors", "tokenizer.json", "README.md",
              "generation_config.json"):
        assert (out / f).exists(), f
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    merged = AutoModelForCausalLM.from_pretrained(out)
    if from_nf4:  # what was trained: the 4-bit base with the adapter
        ref_model, _ = load_trained(open_trained(run))
    else:
        base = AutoModelForCausalLM.from_pretrained(json.loads(
            (run / "run.json").read_text())["base_model"])
        ref_model = PeftModel.from_pretrained(base, str(run))
    with torch.no_grad():
        a, b = merged(input_ids=_ids()).logits, ref_model(input_ids=_ids()).logits
    assert torch.allclose(a, b, atol=1e-4)
    # and the merge is not a no-op
    plain = AutoModelForCausalLM.from_pretrained(json.loads(
        (run / "run.json").read_text())["base_model"])
    with torch.no_grad():
        assert (plain(input_ids=_ids()).logits - a).abs().max() > 1e-3
    # an existing output is refused without --overwrite, and kept
    res = qdpo(*args)
    assert res.returncode == 2 and "--overwrite" in res.stderr
    assert (out / "model.safetensors").exists()


def test_export_peft(run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter"
    res = qdpo("export", run, "--format", "peft", "--out", out)
    assert res.returncode == 0, res.stderr
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                                "README.md", "tokenizer.json"}
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    cfg = json.loads((out / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"])
    m = PeftModel.from_pretrained(base, str(out))
    m2 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
        cfg["base_model_name_or_path"]), str(run))
    with torch.no_grad():
        assert torch.equal(m(input_ids=_ids()).logits, m2(input_ids=_ids()).logits)


def test_bad_sources_fail_cleanly(tmp_path):
    (tmp_path / "empty").mkdir()
    for cmd in (["merge", tmp_path / "empty", "--out", tmp_path / "m"],
                ["export", tmp_path / "nowhere", "--format", "peft", "--out", tmp_path / "e"],
                ["chat", tmp_path / "empty"],
                ["eval", tmp_path / "empty", "--data", QUICKSTART / "eval.jsonl"]):
        res = qdpo(*cmd)
        assert res.returncode == 2, (cmd, res.stderr)
        assert "Traceback" not in res.stderr and "error:" in res.stderr


def test_missing_base_model_fails_cleanly(run, tmp_path):
    import shutil

    adapter = tmp_path / "orphan"
    shutil.copytree(run, adapter, ignore=shutil.ignore_patterns("checkpoints"))
    import yaml

    missing = str(tmp_path / "no-such-model")
    info = json.loads((adapter / "run.json").read_text())
    info["base_model"] = missing
    (adapter / "run.json").write_text(json.dumps(info))
    recipe = yaml.safe_load((adapter / "recipe.yaml").read_text())
    recipe["model"].update(name_or_path=missing, random_init=False)
    (adapter / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    res = qdpo("merge", adapter, "--out", tmp_path / "m")
    assert res.returncode == 2 and "no-such-model" in res.stderr
    assert "Traceback" not in res.stderr


def test_chat_commands_and_compare(run):
    script = "Tell me about the night sky.\n/system Be brief.\nAnd the lake?\n/reset\n/exit\n"
    res = qdpo("chat", run, "--max-new-tokens", "8", "--seed", "0", stdin=script)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("tuned>") == 2
    assert "system prompt set" in res.stdout and "conversation reset" in res.stdout
    res = qdpo("chat", run, "--compare", "--max-new-tokens", "8", "--temperature", "0",
               stdin="Hello there\n/exit\n")
    assert res.returncode == 0, res.stderr
    assert "base" in res.stdout and "tuned" in res.stdout


def test_compare_uses_same_weights_with_adapters_off(run):
    from qdpo.chat import Generator, Sampling
    from qdpo.model import load_trained
    from qdpo.rundir import open_trained

    src = open_trained(run)
    model, tok = load_trained(src)
    gen = Generator(model, tok, src.recipe)
    conv = [[{"role": "user", "content": "What do you think about the night sky?"}]]
    greedy = Sampling(max_new_tokens=12, temperature=0)
    tuned = gen.generate(conv, greedy)
    base = gen.generate(conv, greedy, base=True)
    assert tuned != base
    assert gen.generate(conv, greedy) == tuned  # the base pass left the adapters on


def test_generate_file(run, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "What do you think about the night sky?"}) + "\n"
                       + json.dumps({"prompt": [{"role": "user", "content": "Hi"}]}) + "\n")
    out = tmp_path / "out.jsonl"
    res = qdpo("generate", run, "--prompts", prompts, "--out", out, "--compare",
               "--max-new-tokens", "6", "--temperature", "0")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 2 and all("response" in r and "base_response" in r for r in rows)
    assert rows[1]["prompt"] == [{"role": "user", "content": "Hi"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\n')
    res = qdpo("generate", run, "--prompts", bad, "--out", tmp_path / "o2.jsonl")
    assert res.returncode == 2 and "line 1" in res.stderr
    text = tmp_path / "prompts.txt"  # plain prompts, one per line, as qdpo pairs reads them
    text.write_text("Tell me about tea.\n\nHow do I fix a flat tyre?\n")
    res = qdpo("generate", run, "--prompts", text, "--out", tmp_path / "o3.jsonl",
               "--max-new-tokens", "4", "--temperature", "0")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(x) for x in (tmp_path / "o3.jsonl").read_text().splitlines()]
    assert [r["prompt"][0]["content"] for r in rows] == ["Tell me about tea.",
                                                         "How do I fix a flat tyre?"]
    huge = tmp_path / "huge.jsonl"  # one "word" of a million characters: no tokenizer crawl
    huge.write_text(json.dumps({"prompt": "z" * 1_000_000}) + "\n")
    res = qdpo("generate", run, "--prompts", huge, "--out", tmp_path / "o4.jsonl")
    assert res.returncode == 2 and "1,000,000 characters" in res.stderr
    cut = tmp_path / "cut.jsonl"  # a lone surrogate, as data rows are checked
    cut.write_text('{"prompt": "a\\ud800b"}\n')
    res = qdpo("generate", run, "--prompts", cut, "--out", tmp_path / "o5.jsonl")
    assert res.returncode == 2 and "line 1: text is not valid Unicode" in res.stderr


def test_eval_json_matches_training_eval(run):
    res = qdpo("eval", run, "--data", QUICKSTART / "eval.jsonl", "--json")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    final = json.loads((run / "summary.json").read_text())["eval"]
    assert got["pairs"] == 64
    for k in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
              "logps/chosen", "logps/rejected", "logps/ref_chosen", "logps/ref_rejected",
              "loss"):
        assert got[k] == pytest.approx(final[k], abs=2e-3), k
    table = qdpo("eval", run, "--data", QUICKSTART / "eval.jsonl", "--max-pairs", "4")
    assert "rewards/accuracies" in table.stdout and "│ pairs" in table.stdout


def test_cleared_cache_rebuilds_random_init_base(run, tmp_path, monkeypatch):
    """Deleting the cache is safe: a random-init run's base is rebuilt from config + seed."""
    monkeypatch.setenv("QDPO_CACHE", str(tmp_path / "empty-cache"))
    res = qdpo("eval", run, "--data", QUICKSTART / "eval.jsonl", "--max-pairs", "8", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["rewards/accuracies"] >= 0.75


def test_outputs_may_not_overlap_the_source(run, tmp_path):
    res = qdpo("merge", run, "--out", run / "merged", "--overwrite")
    assert res.returncode == 2 and "overlaps" in res.stderr
    res = qdpo("export", run, "--format", "peft", "--out", run, "--overwrite")
    assert res.returncode == 2 and "overlaps" in res.stderr
    assert (run / "adapter_model.safetensors").exists()


def _beside(out):
    """Everything in out's directory other than out itself (temporaries would show here)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def test_failed_exports_keep_old_output_and_leave_no_temporaries(run, tmp_path, monkeypatch):
    """Each export fails half-way (its temporary already holds the new weights): the existing
    output is untouched and nothing is left beside it; then a complete one replaces it."""
    import qdpo.export as ex
    import qdpo.export.adapter as adapter_mod
    import qdpo.export.merging as merging

    class Killed(Exception):
        pass

    def die_half_way(out, weights):
        def fail(*args, **kwargs):
            tmps = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
            assert len(tmps) == 1 and (tmps[0] / weights).is_file(), tmps
            raise Killed("killed")
        return fail

    for name, call, weights, module, step in (
            ("adapter", lambda o, **k: ex.export_peft(run, o, **k),
             "adapter_model.safetensors", adapter_mod, "model_card"),
            ("merged", lambda o, **k: ex.merge(run, o, dtype="fp32", **k),
             "model.safetensors", merging, "_merged_card")):
        out = tmp_path / name / "out"
        out.mkdir(parents=True)
        (out / "README.md").write_text("old")  # an earlier export's card
        with monkeypatch.context() as m:
            m.setattr(module, step, die_half_way(out, weights))
            with pytest.raises(Killed):
                call(out, overwrite=True)
        assert [p.name for p in out.iterdir()] == ["README.md"], name
        assert _beside(out) == [], name
        with pytest.raises(RunDirError, match="--overwrite"):
            call(out)
        call(out, overwrite=True)
        assert (out / weights).is_file() and (out / "README.md").read_text() != "old"
        assert _beside(out) == [], name


def test_failed_gguf_export_removes_its_merge_scratch(run, tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    import qdpo.export as ex
    import qdpo.export.gguf as gguf_mod

    out = tmp_path / "m.gguf"
    out.write_bytes(b"GGUF old")  # an earlier export (GGUF files start with their magic)
    seen = []

    def fail(model_dir, out_path, outtype, name=None):
        seen.append(model_dir)
        assert (model_dir / "model.safetensors").is_file() and model_dir.parent.parent == tmp_path
        raise RuntimeError("killed")

    monkeypatch.setattr(gguf_mod, "export_gguf", fail)
    with pytest.raises(RuntimeError, match="killed"):
        ex.export(run, "gguf", out, outtype="f32", overwrite=True)
    assert seen and not seen[0].exists()
    assert out.read_bytes() == b"GGUF old" and _beside(out) == []


def test_gguf_export_checks_the_gguf_package_before_merging(run, tmp_path, monkeypatch):
    import sys

    import qdpo.export.formats as formats
    import qdpo.export.merging as merging

    merged = []

    def no_merge(*args, **kwargs):
        merged.append(args)
        raise AssertionError("merged before checking for gguf")

    monkeypatch.setattr(formats, "merge", no_merge)
    monkeypatch.setattr(merging, "merge", no_merge)
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    for fmt in ("gguf", "gguf-lora"):
        res = qdpo("export", run, "--format", fmt, "--out", tmp_path / f"{fmt}.gguf")
        assert res.returncode == 2, res.stderr
        assert "pip install 'qdpo[gguf]'" in res.stderr and "Traceback" not in res.stderr
    assert merged == [] and list(tmp_path.iterdir()) == []


def _gguf_kv(path):
    gguf = pytest.importorskip("gguf")
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}


def test_gguf_export_is_named_after_the_run_with_an_ollama_modelfile(run, tmp_path):
    pytest.importorskip("gguf")
    out = tmp_path / "q.gguf"
    res = qdpo("export", run, "--format", "gguf", "--out", out, "--outtype", "f32")
    assert res.returncode == 0, res.stderr
    assert _gguf_kv(out)["general.name"] == run.name
    modelfile = (tmp_path / "Modelfile").read_text()
    assert "FROM ./q.gguf" in modelfile.splitlines()
    assert "<|im_start|>user\n{{ .Content }}<|im_end|>" in modelfile  # the run's ChatML
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert f"ollama create {run.name} -f {tmp_path / 'Modelfile'}" in res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "q.gguf"]
    # a checkpoint's GGUF LoRA adapter carries the run's name too
    step = sorted((run / "checkpoints").iterdir())[-1]
    res = qdpo("export", step, "--format", "gguf-lora", "--out", tmp_path / "a.gguf")
    assert res.returncode == 0, res.stderr
    assert _gguf_kv(tmp_path / "a.gguf")["general.name"] == run.name


def test_gguf_export_of_a_bare_adapter_is_named_after_its_directory(run, tmp_path):
    import shutil

    pytest.importorskip("gguf")
    adapter = tmp_path / "My Adapter"
    adapter.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
              "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy2(run / f, adapter / f)
    out = tmp_path / "out" / "bare.gguf"
    res = qdpo("export", adapter, "--format", "gguf", "--out", out, "--outtype", "f32")
    assert res.returncode == 0, res.stderr
    assert _gguf_kv(out)["general.name"] == "My Adapter"
    assert "ollama create my-adapter -f" in res.stdout
    assert "FROM ./bare.gguf" in (out.parent / "Modelfile").read_text()


def _card(path):
    import yaml

    text = path.read_text()
    assert text.startswith("---\n")
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def test_exported_and_merged_model_cards(run, tmp_path):
    import qdpo.export as ex

    summary = json.loads((run / "summary.json").read_text())
    ex.export_peft(run, tmp_path / "adapter")
    meta, body = _card(tmp_path / "adapter" / "README.md")
    assert meta["library_name"] == "peft" and {"dpo", "qdpo"} <= set(meta["tags"])
    assert "base_model" not in meta  # a random-init base is nothing on the hub
    assert f"# {run.name}" in body and "sigmoid (beta 0.1)" in body
    assert f"| optimizer steps | {summary['steps']} of" in body
    acc = summary["eval"]["rewards/accuracies"]
    assert f"| rewards/accuracies | {acc:.4f} |" in body
    assert f"on {summary['eval']['pairs']} held-out pairs" in body
    assert "local data `train.jsonl`" in body and "AutoPeftModelForCausalLM" in body
    ex.merge(run, tmp_path / "merged", dtype="fp32")
    meta, body = _card(tmp_path / "merged" / "README.md")
    assert meta["library_name"] == "transformers"
    assert "| rewards/margins |" in body and "AutoModelForCausalLM" in body


def test_run_directory_readme_is_a_model_card(run):
    """Not peft's empty template: the run's own card, written after the final adapter."""
    summary = json.loads((run / "summary.json").read_text())
    text = (run / "README.md").read_text()
    assert "Model Card for Model ID" not in text and "More Information Needed" not in text
    meta, body = _card(run / "README.md")
    assert meta["library_name"] == "peft" and {"dpo", "qdpo"} <= set(meta["tags"])
    assert "base_model" not in meta  # not the random-init base's folder in the cache
    assert "datasets" not in meta  # local data: nothing the hub knows
    assert "license" not in meta and "license" in text.split("---\n", 2)[1]
    assert f"# {run.name}" in body and "random init of `model`" in body
    assert "sigmoid (beta 0.1)" in body and "r=16, alpha=32" in body
    assert f"| optimizer steps | {summary['steps']} of {summary['steps']} |" in body
    acc = summary["eval"]["rewards/accuracies"]
    assert f"| rewards/accuracies | {acc:.4f} |" in body
    assert f"on {summary['eval']['pairs']} held-out pairs" in body
    assert "local data `train.jsonl`" in body and "local data `eval.jsonl`" in body
    assert f"PeftModel.from_pretrained(base, '{run}')" in body and f"qdpo chat {run}" in body
    assert "## License" in body


def test_overwrite_replaces_only_an_earlier_export(run, tmp_path):
    import qdpo.export as ex

    mine = tmp_path / "documents"
    mine.mkdir()
    (mine / "thesis.docx").write_text("years of work")
    with pytest.raises(RunDirError, match="thesis.docx"):
        ex.export_peft(run, mine, overwrite=True)
    assert (mine / "thesis.docx").read_text() == "years of work"
    note = tmp_path / "notes.txt"
    note.write_text("mine")
    with pytest.raises(RunDirError, match="notes.txt"):
        ex.export(run, "gguf-lora", note, overwrite=True)
    assert note.read_text() == "mine"
    renamed = tmp_path / "holiday.gguf"  # named like an export, but not a GGUF file
    renamed.write_text("my notes")
    with pytest.raises(RunDirError, match="holiday.gguf"):
        ex.export(run, "gguf-lora", renamed, overwrite=True)
    assert renamed.read_text() == "my notes"


# --------------------------------------------------------------------------------------
# chat, generate and eval: banner and context, plain models, row fields, eval overrides
# --------------------------------------------------------------------------------------

def test_chat_banner_and_history_trimmed_to_the_context(run):
    # context 512, replies up to 8 tokens: three messages of ~170 tokens do not fit
    msgs = [f"Message {i}: " + " ".join(["the lake and the harbour lights at night"] * 15)
            for i in range(3)]
    res = qdpo("chat", run, "--max-new-tokens", "8", "--temperature", "0",
               stdin="\n".join(msgs + ["/exit"]) + "\n")
    assert res.returncode == 0, res.stderr
    assert f"adapter {run}" in res.stdout and "device cpu" in res.stdout
    assert "4-bit nf4" in res.stdout and "context 512 tokens" in res.stdout
    assert res.stdout.count("dropped the 1 oldest turn of the conversation") == 1
    assert res.stdout.count("tuned>") == 3


@pytest.fixture(scope="module")
def merged(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "merged"
    res = qdpo("merge", run, "--out", out, "--dtype", "fp32")
    assert res.returncode == 0, res.stderr
    return out


def test_plain_model_directory_chats_and_generates_but_has_no_base(merged, tmp_path):
    res = qdpo("chat", merged, "--max-new-tokens", "4", stdin="Hello\n/exit\n")
    assert res.returncode == 0, res.stderr
    assert "no adapter" in res.stdout and res.stdout.count("model>") == 1
    res = qdpo("chat", merged, "--compare", stdin="/exit\n")
    assert res.returncode == 2 and "no base to compare" in res.stderr
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a1", "prompt": "Hi"}) + "\n")
    out = tmp_path / "out.jsonl"
    res = qdpo("generate", merged, "--prompts", prompts, "--out", out, "--max-new-tokens", "4")
    assert res.returncode == 0, res.stderr
    assert json.loads(out.read_text())["id"] == "a1"
    res = qdpo("generate", merged, "--prompts", prompts, "--out", out, "--compare",
               "--overwrite")
    assert res.returncode == 2 and "no base to compare" in res.stderr
    res = qdpo("eval", merged, "--data", QUICKSTART / "eval.jsonl")
    assert res.returncode == 2 and "no reference" in res.stderr and "--reference" in res.stderr
    assert "Traceback" not in res.stderr
    # merge and export still want an adapter, and say so
    res = qdpo("export", merged, "--format", "peft", "--out", tmp_path / "e")
    assert res.returncode == 2 and "plain model directory" in res.stderr


def test_eval_of_a_merged_model_against_the_base_it_came_from(run, merged):
    """--reference: another model gives the reference log-probs. The run against its base
    given that way is the run against its own weights with the adapter off, exactly; the
    merged model (the same weights folded in, quantized again) comes close to it."""
    data = QUICKSTART / "eval.jsonl"
    own = json.loads(qdpo("eval", run, "--data", data, "--json").stdout)
    res = qdpo("eval", run, "--data", data, "--json", "--reference", QUICKSTART_RECIPE)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == own
    res = qdpo("eval", merged, "--data", data, "--json", "--reference", QUICKSTART_RECIPE)
    assert res.returncode == 0, res.stderr
    folded = json.loads(res.stdout)
    assert folded["logps/ref_chosen"] == own["logps/ref_chosen"]  # the same reference
    assert folded["rewards/accuracies"] == pytest.approx(own["rewards/accuracies"], abs=0.05)
    assert folded["rewards/margins"] == pytest.approx(own["rewards/margins"], rel=0.1)
    assert own["rewards/margins"] > 0.05  # (it trained: the comparison means something)


def test_generate_keeps_the_rows_other_fields(run, tmp_path):
    prompts = tmp_path / "p.jsonl"
    rows = [{"id": 1, "category": "sky", "prompt": "What about the night sky?"},
            {"messages": [{"role": "user", "content": "Hi"}], "id": "two", "meta": {"x": [1]}}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    res = qdpo("generate", run, "--prompts", prompts, "--out", out, "--compare",
               "--max-new-tokens", "4", "--temperature", "0")
    assert res.returncode == 0, res.stderr
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(g["id"], g.get("category"), g.get("meta")) for g in got] == \
        [(1, "sky", None), ("two", None, {"x": [1]})]
    assert all("response" in g and "base_response" in g for g in got)
    assert got[1]["prompt"] == [{"role": "user", "content": "Hi"}] and "messages" not in got[1]


def test_eval_takes_recipe_overrides(run, tmp_path):
    renamed = tmp_path / "renamed.jsonl"
    rows = [json.loads(x) for x in (QUICKSTART / "eval.jsonl").read_text().splitlines()]
    renamed.write_text("".join(json.dumps({"Question": r["prompt"], "Good": r["chosen"],
                                           "Bad": r["rejected"]}) + "\n" for r in rows[:8]))
    plain = qdpo("eval", run, "--data", QUICKSTART / "eval.jsonl", "--max-pairs", "8", "--json")
    assert plain.returncode == 0, plain.stderr
    res = qdpo("eval", run, "data.columns.prompt=Question", "data.columns.chosen=Good",
               "data.columns.rejected=Bad", "--data", renamed, "--json")
    assert res.returncode == 0, res.stderr
    got, want = json.loads(res.stdout), json.loads(plain.stdout)
    assert got["pairs"] == 8
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
    res = qdpo("eval", run, "--data", renamed)  # without the mapping: a clear data error
    assert res.returncode == 2 and "Traceback" not in res.stderr
    res = qdpo("eval", run, "data.no_such_key=1", "--data", renamed)
    assert res.returncode == 2 and "no_such_key" in res.stderr


def test_a_received_run_runs_no_model_code_without_the_flag(run, tmp_path):
    import shutil

    received = tmp_path / "received"
    shutil.copytree(run, received)
    recipe = received / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("trust_remote_code: false",
                                                 "trust_remote_code: true"))
    assert "trust_remote_code: true" in recipe.read_text()
    for args in (("merge", received, "--out", tmp_path / "m"),
                 ("eval", received, "--data", QUICKSTART / "eval.jsonl", "--max-pairs", "2"),
                 ("export", received, "--format", "gguf-lora", "--out", tmp_path / "a.gguf")):
        res = qdpo(*args)
        assert res.returncode != 0 and "--trust-remote-code" in res.stderr, args
        assert "Traceback" not in res.stderr
    res = qdpo("eval", received, "--data", QUICKSTART / "eval.jsonl", "--max-pairs", "2",
               "--trust-remote-code")
    assert res.returncode == 0, res.stderr


def test_eval_on_the_runs_own_training_data_says_so(run):
    res = qdpo("eval", run, "--data", QUICKSTART / "train.jsonl", "--max-pairs", "4")
    assert res.returncode == 0, res.stderr
    assert "is this run's training data" in res.stderr
    res = qdpo("eval", run, "--data", QUICKSTART / "eval.jsonl", "--max-pairs", "4")
    assert res.returncode == 0 and "training data" not in res.stderr


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux's read-only /sys")
def test_an_unwritable_output_folder_is_said_before_merging(run):
    for args in (["merge", run, "--out", "/sys/qdpo-merged"],
                 ["export", run, "--format", "gguf-lora", "--out", "/sys/qdpo.gguf"]):
        res = qdpo(*args)
        assert res.returncode == 2 and "Cannot write into '/sys'" in res.stderr, res.stderr
