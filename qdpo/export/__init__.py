"""After training: merge the adapter into a full-precision base, and export it to other formats.

One module per concern:

* `merging`     merge(): base + adapter as one transformers model; dequantize_base
* `card`        model_card(), run_card(): the README.md of an export or a run directory
                (Hugging Face front matter, the run)
* `adapter`     export_peft(): a clean peft adapter directory
* `formats`     export(): the one entry point per --format (FORMATS)
* `gguf`        export_gguf(): a merged model as one GGUF file (tensor plan, hparams)
* `ollama`      write_modelfile(): the Ollama Modelfile beside a GGUF model file
* `gguf_vocab`  the tokenizer part of a GGUF model file
* `gguf_lora`   export_gguf_lora(): a LoRA adapter as a llama.cpp GGUF adapter
* `gguf_common` architectures, tensor types and the streaming, atomic GGUF writer
* `output`      where an output may go (--overwrite, no overlap with the source)

Every output is written under a temporary name and renamed when complete (`qdpo.files`), so an
export that fails or is interrupted leaves the old output, or none, and no temporary behind.

The names below are imported on first use, so that `import qdpo.export.gguf` does not pull in
torch, peft or the run-directory code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from qdpo import callable_module

if TYPE_CHECKING:
    from qdpo.export.adapter import export_peft
    from qdpo.export.formats import FORMATS, export
    from qdpo.export.gguf import export_gguf
    from qdpo.export.gguf_common import GGUF_MISSING, OUTTYPES
    from qdpo.export.gguf_lora import export_gguf_lora
    from qdpo.export.card import model_card
    from qdpo.export.merging import DTYPES, dequantize_base, merge

_WHERE = {
    "merge": "merging", "DTYPES": "merging", "dequantize_base": "merging",
    "model_card": "card", "export_peft": "adapter", "export": "formats",
    "FORMATS": "formats", "export_gguf": "gguf", "export_gguf_lora": "gguf_lora",
    "GGUF_MISSING": "gguf_common", "OUTTYPES": "gguf_common",
}

__all__ = ["DTYPES", "FORMATS", "GGUF_MISSING", "OUTTYPES", "dequantize_base", "export",
           "export_gguf", "export_gguf_lora", "export_peft", "merge", "model_card"]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"qdpo.export.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qdpo.export' has no attribute {name!r}")


def _export(*args: Any, **kwargs: Any) -> Any:
    from qdpo.export.formats import export

    return export(*args, **kwargs)


# `qdpo.export(run, fmt, out)` calls formats.export, though qdpo.export is this package
callable_module(__name__, _export)
