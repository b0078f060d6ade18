"""The model card (README.md) of a run directory, an exported adapter or a merged model.

A Hugging Face card: YAML front matter the hub reads (``base_model``, ``library_name``, ``tags``,
``datasets``), then what a reader needs to trust and reuse the model: the base, the data, the
loss and its settings, how long it trained, the held-out metrics of the run's summary.json, and
how to load it. The license is left to the user (it depends on the base model and the data,
which qdpo cannot judge); the card says so.

Only ids that name something on the hub go into the front matter: a local base model or data
file would make the hub reject the card, so those appear in the text, by file name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from qdpo.recipe import Recipe
from qdpo.rundir import RunDir, TrainedSource

QDPO_URL = "https://pypi.org/project/qdpo/"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
# loss -> the recipe's loss.* settings that change what it computes (beyond beta)
_LOSS_SETTINGS = {"simpo": ("simpo_gamma",), "orpo": ("orpo_lambda",), "dpop": ("dpop_lambda",),
                  "discopop": ("discopop_tau",)}
_NO_BETA = ("sft", "orpo")
_METRICS = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
            "logps/chosen", "logps/rejected", "loss")


def model_card(src: TrainedSource, extra: str = "", library: str = "peft") -> str:
    """README.md for an export of `src`: front matter, then the run in prose and tables.

    library: ``peft`` for an adapter, ``transformers`` for a merged model. `extra` (how to load
    this export) goes under "How to use"."""
    summary = _read_json(src.run.path / "summary.json") if src.run is not None else {}
    info = src.run.info() if src.run is not None else {}
    kind = "LoRA adapter" if library == "peft" else "merged model"
    lines = [_front_matter(src, library), "", f"# {_title(src)}", "",
             f"A {kind} fine-tuned from {_base_text(src)} by preference optimisation with "
             f"[qdpo]({QDPO_URL}) (QLoRA: LoRA adapters trained on a 4-bit base).", ""]
    lines += _training_section(src, summary, info)
    lines += _data_section(src, info)
    lines += _metrics_section(summary)
    if extra:
        lines += ["## How to use", "", extra, ""]
    lines += ["## License", "",
              "Not set: qdpo does not choose a license. Add a `license:` key to the front "
              "matter that respects the base model's license and the data's terms.", ""]
    return "\n".join(lines)


def write_run_card(run: RunDir, recipe: Recipe) -> None:
    """README.md of a finished run: the model card of its final adapter (replacing peft's empty
    template), from the summary just written. A run is not lost for want of its card."""
    from qdpo import console as ui
    from qdpo.errors import QdpoError
    from qdpo.files import short_error, write_text_atomically

    if not (run.path / "adapter_config.json").exists():  # interrupted: no final adapter
        return
    try:
        write_text_atomically(run.path / "README.md", run_card(run, recipe))
    except (QdpoError, OSError) as e:
        ui.warn(f"could not write the model card README.md ({short_error(e)})")


def run_card(run: RunDir, recipe: Recipe) -> str:
    """README.md of a run directory, which is itself a peft adapter directory: written after
    the final adapter (replacing peft's empty template) and the summary, whose held-out
    metrics it shows."""
    src = TrainedSource(run.path, recipe, run.info().get("base_model") or
                        recipe.model.name_or_path, run)
    here = str(run.path)
    base = "BASE" if recipe.model.random_init else src.base_path
    load = ("A LoRA adapter in peft's format (this directory), on its base model:\n\n"
            "```python\nfrom peft import PeftModel\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"base = AutoModelForCausalLM.from_pretrained('{base}')\n"
            f"model = PeftModel.from_pretrained(base, '{here}')\n"
            f"tok = AutoTokenizer.from_pretrained('{here}')\n```\n\n")
    if recipe.model.random_init:
        load += ("The base is a seeded random initialisation (model.random_init) that qdpo "
                 "rebuilds from the recipe, so the qdpo commands are the simplest way in: ")
    else:
        load += "Or with qdpo: "
    load += (f"`qdpo chat {here}`, `qdpo eval {here} --data DATA.jsonl`, "
             f"`qdpo merge {here} --out merged`.")
    return model_card(src, load, library="peft")


def _title(src: TrainedSource) -> str:
    root = src.run.path if src.run is not None else src.adapter_dir
    return root.resolve().name


def hub_id(name: str, local: Path | None = None) -> str | None:
    """`name` when it can only be a hub id (no local file or directory of that name), else
    None."""
    if not name or name.startswith((".", "/", "~")) or any(c in name for c in "*?[\\"):
        return None
    if name.endswith(_LOCAL_SUFFIXES) or Path(name).exists() or (local and local.exists()):
        return None
    return name if _HUB_ID.match(name) else None


def _base_hub_id(src: TrainedSource) -> str | None:
    return None if src.recipe.model.random_init else hub_id(src.base_path)


def _base_text(src: TrainedSource) -> str:
    if src.recipe.model.random_init:
        return (f"a randomly initialised `{Path(src.recipe.model.name_or_path).name}` "
                "(model.random_init: a test or demo model)")
    hub = _base_hub_id(src)
    if hub:
        return f"[{hub}](https://huggingface.co/{hub})"
    return f"the local model `{Path(src.base_path).name}`"


def _dataset_ids(src: TrainedSource) -> list[str]:
    r = src.recipe
    ids: list[str] = []
    for s in r.data.train + r.eval.data:
        hub = hub_id(s.path, Path(r.resolve_path(s.path)))
        if hub and hub not in ids:
            ids.append(hub)
    return ids


def _front_matter(src: TrainedSource, library: str) -> str:
    meta: dict[str, Any] = {}
    base = _base_hub_id(src)
    if base:
        meta["base_model"] = base
    meta["library_name"] = library
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["dpo", "qdpo"] + [t for t in src.recipe.loss_types if t != "sigmoid"]
    datasets = _dataset_ids(src)
    if datasets:
        meta["datasets"] = datasets
    body = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    return ("---\n" + body + "# license: not set by qdpo; add the base model's / data's license"
            "\n---")


def _loss_text(src: TrainedSource) -> str:
    loss = src.recipe.loss
    parts = []
    for i, t in enumerate(src.recipe.loss_types):
        settings = [] if t in _NO_BETA else [f"beta {loss.beta:g}"]
        settings += [f"{k} {getattr(loss, k):g}" for k in _LOSS_SETTINGS.get(t, ())]
        if loss.label_smoothing and t not in _NO_BETA:
            settings.append(f"label_smoothing {loss.label_smoothing:g}")
        weight = f"{loss.weights[i]:g} x " if loss.weights else ""
        parts.append(f"{weight}{t}" + (f" ({', '.join(settings)})" if settings else ""))
    text = " + ".join(parts)
    if loss.ld_alpha is not None:
        text += f"; LD-DPO ld_alpha {loss.ld_alpha:g}"
    return text


def _training_section(src: TrainedSource, summary: dict[str, Any],
                      info: dict[str, Any]) -> list[str]:
    r = src.recipe
    rows = [("base model", f"`{src.base_path}`" if not r.model.random_init else
             f"random init of `{Path(r.model.name_or_path).name}`"),
            ("loss", _loss_text(src)),
            ("reference", "none (reference-free loss)" if not r.needs_reference else
             "the base with the adapter switched off" if not r.lora.init_adapter else
             "the starting adapter, frozen"),
            ("LoRA", f"r={r.lora.r}, alpha={r.lora.alpha:g}, targets {r.lora.target_modules}"
             + (" (rsLoRA)" if r.lora.use_rslora else "")),
            ("quantization during training", r.model.quantization)]
    if src.run is not None:
        steps = summary.get("steps")
        total = info.get("total_steps")
        if steps is not None:
            rows.append(("optimizer steps", f"{steps}" + (f" of {total}" if total else "")
                         + (" (interrupted)" if summary.get("interrupted") else "")))
        rows += [("pairs per step", str(r.train.pairs_per_step)),
                 ("learning rate", f"{r.train.learning_rate:g} ({r.train.lr_scheduler})"),
                 ("max length", f"{r.data.max_length} tokens "
                  f"(prompt {r.data.max_prompt_length})")]
    return ["## Training", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]


def _source_text(src: TrainedSource, s: Any) -> str:
    hub = hub_id(s.path, Path(src.recipe.resolve_path(s.path)))
    if hub:
        extra = ", ".join(x for x in (s.name and f"config {s.name}", f"split {s.split}",
                                      s.revision and f"revision {s.revision}") if x)
        return f"[{hub}](https://huggingface.co/datasets/{hub}) ({extra})"
    return f"local data `{Path(s.path).name}`"


def _data_section(src: TrainedSource, info: dict[str, Any]) -> list[str]:
    r = src.recipe
    if src.run is None or not r.data.train:
        return []
    lines = ["## Data", ""]
    lines += [f"- training: {_source_text(src, s)}" for s in r.data.train]
    lines += [f"- held out: {_source_text(src, s)}" for s in r.eval.data]
    if not r.eval.data and r.eval.split_fraction:
        lines.append(f"- held out: {r.eval.split_fraction:g} of the training pairs")
    counts = [f"{info[k]} {what} pairs" for k, what in (("train_pairs", "training"),
                                                         ("eval_pairs", "held-out"))
              if info.get(k)]
    if counts:
        lines += ["", f"{', '.join(counts)}."]
    chat = r.data.chat_template
    lines += ["", "Chat format: " + ("the tokenizer's chat template" if chat == "auto" else
                                     "plain text" if chat == "none" else
                                     f"`{chat}`" if "\n" not in chat and len(chat) < 40 else
                                     "a custom chat template (in the recipe)") + ".", ""]
    return lines


def _metrics_section(summary: dict[str, Any]) -> list[str]:
    ev = summary.get("eval") or {}
    shown = [(k, ev[k]) for k in _METRICS if isinstance(ev.get(k), (int, float))]
    if not shown:
        return []
    pairs = ev.get("pairs")
    lines = ["## Held-out metrics", "",
             "At the end of training" + (f", on {int(pairs)} held-out pairs" if pairs else "")
             + " (rewards: the loss's implicit rewards; accuracies: how often the chosen "
             "response out-scores the rejected one):", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in shown]
    return lines + [""]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
