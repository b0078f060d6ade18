"""`export_peft`: a clean peft adapter directory (weights, config, tokenizer, model card), without
the run's checkpoints, metrics and caches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from qdpo import console as ui
from qdpo.export.merging import model_card
from qdpo.export.output import check_out, source_root
from qdpo.files import atomic_dir
from qdpo.rundir import open_trained

KEEP = ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
        "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
        "tokenizer.model", "vocab.json", "merges.txt")


def export_peft(path: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """A clean adapter directory: weights, config, tokenizer, model card.

    Written whole or not at all: an existing output is replaced only once the new one is
    complete."""
    src = open_trained(path, trust_remote_code=True)  # copies files: no model code runs
    out = Path(out)
    check_out(out, overwrite, source_root(src))
    with atomic_dir(out) as tmp:
        for name in KEEP:
            f = src.adapter_dir / name
            if f.exists():
                shutil.copy2(f, tmp / name)
        cfg = json.loads((tmp / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = src.base_path
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "README.md").write_text(model_card(src, (
            "A LoRA adapter in peft's format:\n\n```python\nfrom peft import "
            f"AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM.from_pretrained('{out}')"
            "\n```"), library="peft"))
    ui.info(f"adapter written to {out}")
    return out
