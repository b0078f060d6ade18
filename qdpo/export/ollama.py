"""An Ollama ``Modelfile`` beside a GGUF model file, so that ``ollama create NAME -f Modelfile``
gives the model the chat format it was trained with.

Ollama formats a conversation with a Go template, not with the Jinja chat template of the
tokenizer, so the template is translated here for the families qdpo recognises: Llama-3 headers
(``<|start_header_id|>``), ChatML (``<|im_start|>``, Qwen2) and Mistral ``[INST]``. The family
comes from the chat template the run trained with (``data.chat_template``: the tokenizer's own,
a built-in one or the recipe's string); without any template, from the tokenizer's special
tokens. An unknown format gets a Modelfile without TEMPLATE (Ollama then falls back on what it
detects in the GGUF) and a comment that says so. The Go templates follow the ones Ollama ships
for these model families (``.System`` first, then ``.Messages``; no tool calls).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

from qdpo import console as ui
from qdpo.files import write_text_atomically

HEADER = "# Ollama Modelfile written by qdpo"
DEFAULT_TEMPERATURE = 0.7  # as qdpo chat / generate (qdpo.chat.Sampling)
DEFAULT_TOP_P = 0.9

LLAMA3 = """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- if $last }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- else if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>

{{ .Content }}
{{- if not $last }}<|eot_id|>{{ end }}
{{- end }}
{{- end }}"""

CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ if $last }}<|im_start|>assistant
{{ end }}
{{- else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- end }}
{{- end }}"""

# Mistral puts the system prompt into the last user turn (as its v0.3 chat template does)
MISTRAL = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}[INST] {{ if and $.System $last }}{{ $.System }}

{{ end }}{{ .Content }}[/INST]
{{- else if eq .Role "assistant" }} {{ .Content }}{{ if not $last }}EOS{{ end }}
{{- end }}
{{- end }}"""

# family -> (Go template, stop strings, markers in a chat template / in the special tokens)
FAMILIES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "llama3": (LLAMA3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
               ("<|start_header_id|>", "<|eot_id|>")),
    "chatml": (CHATML, ("<|im_start|>", "<|im_end|>"), ("<|im_start|>", "<|im_end|>")),
    "mistral": (MISTRAL, ("[INST]", "[/INST]"), ("[INST]", "[/INST]")),
}


def detect_family(template: str | None, special_tokens: set[str] | None = None) -> str | None:
    """The chat family of a Jinja chat template; without a template, of the special tokens;
    None when neither matches a family (a Llama-2 ``<<SYS>>`` template included)."""
    if template:
        if "<<SYS>>" in template:
            return None
        for family, (_, _, markers) in FAMILIES.items():
            if markers[0] in template:
                return family
        return None
    tokens = special_tokens or set()
    for family, (_, _, markers) in FAMILIES.items():
        if all(m in tokens for m in markers):
            return family
    return None


def tokenizer_chat_info(model_dir: Path) -> tuple[str | None, set[str], str | None]:
    """(chat template, added/special token strings, eos token) from a saved tokenizer's files,
    without loading it."""
    template: Any = None
    jinja = model_dir / "chat_template.jinja"
    cfg = _read_json(model_dir / "tokenizer_config.json")
    if jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    else:
        template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    tokens = {t.get("content") for t in _read_json(model_dir / "tokenizer.json")
              .get("added_tokens", []) if isinstance(t, dict)}
    eos = cfg.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    return (template if isinstance(template, str) and template else None,
            {t for t in tokens if isinstance(t, str)}, eos if isinstance(eos, str) else None)


def trained_template(setting: str, tokenizer_template: str | None) -> str | None:
    """The chat template training used, for a recipe's data.chat_template setting."""
    if setting == "none":
        return None
    if setting == "auto":
        return tokenizer_template
    from qdpo.data.encode import CHAT_TEMPLATES

    return CHAT_TEMPLATES.get(setting, setting)


def sampling_defaults(recipe: Any) -> tuple[float, float]:
    """(temperature, top_p): a recipe section with sampling settings (``generation`` or
    ``chat``) when the recipe has one, else qdpo chat's defaults."""
    temperature, top_p = DEFAULT_TEMPERATURE, DEFAULT_TOP_P
    for section in ("generation", "chat"):
        cfg = getattr(recipe, section, None)
        if isinstance(getattr(cfg, "temperature", None), (int, float)):
            temperature = float(cfg.temperature)
        if isinstance(getattr(cfg, "top_p", None), (int, float)):
            top_p = float(cfg.top_p)
    return temperature, top_p


def modelfile_text(gguf_name: str, family: str | None, *, eos: str | None = None,
                   system: str | None = None, temperature: float = DEFAULT_TEMPERATURE,
                   top_p: float = DEFAULT_TOP_P, run: str = "", guessed: bool = False) -> str:
    """The Modelfile: FROM the GGUF beside it, TEMPLATE and stop strings of the family, SYSTEM
    (the recipe's system prompt), sampling defaults."""
    lines = [HEADER + (f" for the run {run!r}." if run else "."), f"FROM ./{gguf_name}", ""]
    if family is None:
        lines += ["# No TEMPLATE: the chat format of this model is not one qdpo translates to",
                  "# Ollama's (Llama-3 headers, ChatML / Qwen2, Mistral [INST]), or it was",
                  "# trained on plain text. Ollama uses what it recognises in the GGUF; add a",
                  "# TEMPLATE here for your chat format if replies look wrong.", ""]
    else:
        template, stops, _ = FAMILIES[family]
        if guessed:
            lines.append(f"# {family} chat format guessed from the tokenizer's special tokens "
                         "(no chat template was found).")
        lines += [f'TEMPLATE """{template.replace("EOS", eos or "</s>")}"""', ""]
        lines += [f'PARAMETER stop "{s}"' for s in stops]
    if system and '"""' in system:
        lines += ["", '# SYSTEM left out: the recipe\'s system prompt holds """, which a '
                  'Modelfile cannot quote']
    elif system:
        lines += ["", f'SYSTEM """{system}"""']
    lines += ["", f"PARAMETER temperature {temperature:g}", f"PARAMETER top_p {top_p:g}"]
    return "\n".join(lines) + "\n"


def modelfile_path(gguf_path: Path) -> Path:
    """``Modelfile`` beside the GGUF, unless one is there that qdpo did not write for this very
    file: then ``<gguf stem>.Modelfile`` (another export's or the user's own stays as it is)."""
    plain = gguf_path.with_name("Modelfile")
    try:
        old = plain.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return plain if not plain.exists() else gguf_path.with_name(f"{gguf_path.stem}.Modelfile")
    if old.startswith(HEADER) and f"\nFROM ./{gguf_path.name}\n" in old:
        return plain
    return gguf_path.with_name(f"{gguf_path.stem}.Modelfile")


def ollama_name(name: str) -> str:
    """A name Ollama accepts: lower case letters, digits, '.', '_' and '-'."""
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._") or "qdpo-model"


def write_modelfile(gguf_path: Path, model_dir: Path, recipe: Any, name: str) -> Path:
    """Write the Modelfile for `gguf_path` (a merged model of `recipe`, its tokenizer saved in
    `model_dir`) and say how to create the Ollama model."""
    tok_template, tokens, eos = tokenizer_chat_info(model_dir)
    template = trained_template(recipe.data.chat_template, tok_template)
    family = detect_family(template, tokens if recipe.data.chat_template != "none" else set())
    temperature, top_p = sampling_defaults(recipe)
    text = modelfile_text(gguf_path.name, family, eos=eos, system=recipe.data.system_prompt,
                          temperature=temperature, top_p=top_p, run=name,
                          guessed=family is not None and template is None)
    path = modelfile_path(gguf_path)
    write_text_atomically(path, text)
    if family is None:
        ui.info(f"{path}: no chat TEMPLATE (chat format not recognised); Ollama will guess it")
    ui.info(f"Ollama: ollama create {ollama_name(name)} -f {shlex.quote(str(path))}")
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
