"""Export extras without a trained run: the Ollama Modelfile beside a GGUF model and the model
card of an export (front matter, settings, metrics)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from qdpo.data.encode import CHAT_TEMPLATES
from qdpo.export import ollama
from qdpo.export.card import hub_id, model_card, run_card
from qdpo.recipe import DataSource, Recipe
from qdpo.rundir import RunDir, TrainedSource

# the chat templates of the original tokenizers (abridged: the parts that identify them)
LLAMA3_HF = ("{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + "
             "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
             "'<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}"
             "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
QWEN2_HF = ("{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + "
            "message.content + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if "
            "add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
MISTRAL_HF = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
              "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}"
              "{{ message['content'] + eos_token }}{% endif %}{% endfor %}")
LLAMA2_HF = "{% if messages[0]['role'] == 'system' %}<<SYS>>\\n{% endif %}[INST] ..."


def _tokenizer_dir(path: Path, template: str | None, tokens: list[str],
                   eos: str = "<|im_end|>") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if template is not None:
        (path / "chat_template.jinja").write_text(template)
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
    (path / "tokenizer.json").write_text(json.dumps(
        {"added_tokens": [{"id": i, "content": t} for i, t in enumerate(tokens)]}))
    return path


def _write(tmp_path: Path, template: str | None, tokens: list[str] = (), recipe=None,
           name: str = "My Run", **kw) -> tuple[str, list[str], Path]:
    said: list[str] = []
    model_dir = _tokenizer_dir(tmp_path / "merged", template, list(tokens), **kw)
    gguf_path = tmp_path / "out" / "m.gguf"
    gguf_path.parent.mkdir(exist_ok=True)
    gguf_path.write_bytes(b"GGUF")
    mp = pytest.MonkeyPatch()
    mp.setattr(ollama.ui, "info", said.append)
    try:
        path = ollama.write_modelfile(gguf_path, model_dir, recipe or Recipe.for_adapter("b"),
                                      name)
    finally:
        mp.undo()
    return path.read_text(), said, path


def _template(text: str) -> str:
    return text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]


def test_modelfile_chatml(tmp_path):
    text, said, path = _write(tmp_path, QWEN2_HF, ["<|im_start|>", "<|im_end|>"])
    assert path == tmp_path / "out" / "Modelfile"
    lines = text.splitlines()
    assert "FROM ./m.gguf" in lines
    assert _template(text) == ollama.CHATML
    assert "<|im_start|>assistant\n" in _template(text) and "{{ .System }}" in text
    assert [x for x in lines if x.startswith("PARAMETER stop")] == [
        'PARAMETER stop "<|im_start|>"', 'PARAMETER stop "<|im_end|>"']
    assert "PARAMETER temperature 0.7" in lines and "PARAMETER top_p 0.9" in lines
    assert f"Ollama: ollama create my-run -f {path}" in said
    # the built-in chatml template of a recipe (tokenizer without one) gives the same
    recipe = Recipe.for_adapter("b")
    recipe.data.chat_template = "chatml"
    again, _, _ = _write(tmp_path / "b", None, [], recipe=recipe)
    assert _template(again) == ollama.CHATML


def test_modelfile_llama3(tmp_path):
    recipe = Recipe.for_adapter("b")
    recipe.data.system_prompt = "You are kind."
    text, said, _ = _write(tmp_path, LLAMA3_HF, ["<|begin_of_text|>", "<|eot_id|>",
                                                 "<|start_header_id|>", "<|end_header_id|>"],
                           recipe=recipe, eos="<|eot_id|>")
    tpl = _template(text)
    assert tpl == ollama.LLAMA3
    assert "<|start_header_id|>user<|end_header_id|>\n\n{{ .Content }}<|eot_id|>" in tpl
    assert "<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}" in tpl
    assert [x for x in text.splitlines() if x.startswith("PARAMETER stop")] == [
        'PARAMETER stop "<|start_header_id|>"', 'PARAMETER stop "<|end_header_id|>"',
        'PARAMETER stop "<|eot_id|>"']
    assert 'SYSTEM """You are kind."""' in text
    assert ollama.detect_family(CHAT_TEMPLATES["llama3"]) == "llama3"


def test_modelfile_mistral_and_unknown_formats(tmp_path):
    text, _, _ = _write(tmp_path / "m", MISTRAL_HF, ["[INST]", "[/INST]"], eos="</s>")
    assert "[INST] {{ if and $.System $last }}" in _template(text)
    assert "{{ if not $last }}</s>{{ end }}" in _template(text)
    assert 'PARAMETER stop "[INST]"' in text
    for template in (CHAT_TEMPLATES["zephyr"], LLAMA2_HF):
        text, said, _ = _write(tmp_path / str(len(template)), template, ["<|im_start|>"])
        assert not any(x.startswith("TEMPLATE") for x in text.splitlines())
        assert "# No TEMPLATE" in text and "PARAMETER stop" not in text
        assert "FROM ./m.gguf" in text and "PARAMETER temperature 0.7" in text
        assert any("no chat TEMPLATE" in s for s in said)
        assert any(s.startswith("Ollama: ollama create my-run -f") for s in said)


def test_modelfile_family_from_special_tokens_without_template(tmp_path):
    text, _, _ = _write(tmp_path / "a", None, ["<|start_header_id|>", "<|eot_id|>"])
    assert _template(text) == ollama.LLAMA3 and "guessed from the tokenizer" in text
    recipe = Recipe.for_adapter("b")
    recipe.data.chat_template = "none"  # trained on plain text: no template, whatever tokens
    text, _, _ = _write(tmp_path / "b", None, ["<|start_header_id|>", "<|eot_id|>"],
                        recipe=recipe)
    assert "# No TEMPLATE" in text


def test_modelfile_sampling_from_recipe():
    recipe = SimpleNamespace(generation=SimpleNamespace(temperature=0.2, top_p=0.95))
    assert ollama.sampling_defaults(recipe) == (0.2, 0.95)
    assert ollama.sampling_defaults(Recipe.for_adapter("b")) == (0.7, 0.9)
    text = ollama.modelfile_text("x.gguf", "chatml", temperature=0.2, top_p=0.95)
    assert "PARAMETER temperature 0.2" in text and "PARAMETER top_p 0.95" in text


def test_modelfile_leaves_other_modelfiles_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "Modelfile").write_text("FROM llama3\nSYSTEM mine\n")
    _, _, path = _write(tmp_path, QWEN2_HF)
    assert path == out / "m.Modelfile" and (out / "Modelfile").read_text().startswith("FROM")
    (out / "Modelfile").unlink()
    _, _, first = _write(tmp_path, QWEN2_HF)
    _, _, second = _write(tmp_path, LLAMA3_HF)  # the same GGUF again: its Modelfile replaced
    assert first == second == out / "Modelfile" and "<|eot_id|>" in second.read_text()
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "m.Modelfile", "m.gguf"]
    assert ollama.ollama_name("Qwen2.5 7B/DPO!") == "qwen2.5-7b-dpo"


# --------------------------------------------------------------------------- model card


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def _hub_run(tmp_path: Path) -> TrainedSource:
    run = tmp_path / "qwen-orca-dpo"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({
        "steps": 120, "interrupted": False,
        "eval": {"rewards/accuracies": 0.8125, "rewards/margins": 1.2345, "loss": 0.4321,
                 "pairs": 256}}))
    (run / "run.json").write_text(json.dumps({"total_steps": 120, "train_pairs": 1920,
                                              "eval_pairs": 256}))
    recipe = Recipe.for_adapter("Qwen/Qwen2.5-7B-Instruct")
    recipe.base_dir = str(tmp_path)
    recipe.data.train = [DataSource(path="Intel/orca_dpo_pairs"),
                         DataSource(path="local/train.jsonl")]
    recipe.eval.data = [DataSource(path="HuggingFaceH4/ultrafeedback_binarized",
                                   split="test_prefs")]
    recipe.loss.type = ["sigmoid", "sft"]
    recipe.loss.weights = [1.0, 0.5]
    recipe.loss.beta = 0.05
    return TrainedSource(run, recipe, "Qwen/Qwen2.5-7B-Instruct", RunDir(run))


def test_model_card_front_matter_settings_and_metrics(tmp_path):
    src = _hub_run(tmp_path)
    card = model_card(src, "```python\nload()\n```")
    meta = _front_matter(card)
    assert meta["base_model"] == "Qwen/Qwen2.5-7B-Instruct"
    assert meta["library_name"] == "peft"
    assert {"dpo", "qdpo"} <= set(meta["tags"])
    assert meta["datasets"] == ["Intel/orca_dpo_pairs", "HuggingFaceH4/ultrafeedback_binarized"]
    assert "license" not in meta and "license" in card.split("---\n", 2)[1]
    body = card.split("---\n", 2)[2]
    assert "# qwen-orca-dpo" in body
    assert "1 x sigmoid (beta 0.05) + 0.5 x sft" in body
    assert "| optimizer steps | 120 of 120 |" in body
    assert "| rewards/accuracies | 0.8125 |" in body and "| loss | 0.4321 |" in body
    assert "256 held-out pairs" in body and "local data `train.jsonl`" in body
    assert "split test_prefs" in body and "## How to use\n\n```python\nload()" in body
    merged = _front_matter(model_card(src, library="transformers"))
    assert merged["library_name"] == "transformers" and merged["base_model"]


def test_model_card_of_a_bare_adapter_and_local_bases(tmp_path):
    adapter = tmp_path / "my-adapter"
    adapter.mkdir()
    local_base = tmp_path / "base-model"
    local_base.mkdir()
    src = TrainedSource(adapter, Recipe.for_adapter(str(local_base)), str(local_base), None)
    card = model_card(src)
    meta = _front_matter(card)
    assert "base_model" not in meta and "datasets" not in meta  # nothing the hub would reject
    assert meta["library_name"] == "peft" and "# my-adapter" in card
    assert "local model `base-model`" in card and "Held-out" not in card
    assert hub_id("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    for local in ("data/train.jsonl", "./x", "/abs/path", "a/b/c", "runs/*.jsonl",
                  str(local_base)):
        assert hub_id(local) is None, local


def test_run_card_of_a_hub_base_loads_with_peft(tmp_path):
    src = _hub_run(tmp_path)
    card = run_card(src.run, src.recipe)
    meta = _front_matter(card)
    assert meta["base_model"] == "Qwen/Qwen2.5-7B-Instruct" and meta["library_name"] == "peft"
    assert {"dpo", "qdpo"} <= set(meta["tags"])
    assert meta["datasets"] == ["Intel/orca_dpo_pairs", "HuggingFaceH4/ultrafeedback_binarized"]
    body = card.split("---\n", 2)[2]
    assert "AutoModelForCausalLM.from_pretrained('Qwen/Qwen2.5-7B-Instruct')" in body
    assert f"PeftModel.from_pretrained(base, '{src.run.path}')" in body
    assert "| optimizer steps | 120 of 120 |" in body and "| rewards/accuracies | 0.8125 |" in body
    assert "## License" in body
