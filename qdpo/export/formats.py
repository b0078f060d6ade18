"""`export`: one entry point for every output format (peft adapter, GGUF LoRA adapter, merged
model as GGUF)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from qdpo import console as ui
from qdpo.errors import QdpoError
from qdpo.export.adapter import export_peft
from qdpo.export.merging import merge
from qdpo.export.gguf_common import check_outtype, load_gguf
from qdpo.export.output import check_out, run_name, source_root
from qdpo.rundir import TrainedSource, open_trained

FORMATS = ("peft", "gguf", "gguf-lora")
LORA_OUTTYPES = ("f32", "f16", "bf16")


def export(path: str | Path, fmt: str, out: str | Path, outtype: str = "f16",
           overwrite: bool = False, from_nf4: bool = False, device: str = "cpu",
           trust_remote_code: bool = False) -> Path:
    """Export a run, checkpoint or adapter as `fmt` (one of FORMATS) to `out`.

    Everything that can be checked cheaply (format, the gguf package, outtype, the output
    path) is checked before the minutes-long merge of ``--format gguf``."""
    if fmt not in FORMATS:
        raise QdpoError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}.")
    out = Path(out)
    if fmt != "peft":
        load_gguf()  # QdpoError naming pip install 'qdpo[gguf]'
        outtype = check_outtype(outtype)
    if fmt == "gguf-lora" and outtype not in LORA_OUTTYPES:
        raise QdpoError(f"--outtype {outtype} is for a merged model (--format gguf); a GGUF "
                        "LoRA adapter is written as f16, bf16 or f32 (llama.cpp applies "
                        "adapters unquantized). Use --outtype f16.")
    if fmt == "peft":
        return export_peft(path, out, overwrite)
    src = open_trained(path, trust_remote_code=trust_remote_code)
    check_out(out, overwrite, source_root(src))
    if fmt == "gguf-lora":
        return _gguf_lora(src, out, outtype)
    return _gguf_model(src, path, out, outtype, from_nf4, device)


def _gguf_lora(src: TrainedSource, out: Path, outtype: str) -> Path:
    from qdpo.export.gguf_lora import export_gguf_lora
    from qdpo.model import load_config

    cfg = load_config(src.base_path, src.recipe).to_dict()
    export_gguf_lora(src.adapter_dir, out, base_config=cfg, outtype=outtype, name=run_name(src))
    ui.info(f"GGUF LoRA adapter written to {out}; use it on top of a GGUF of "
            f"{src.base_path} (llama.cpp: --lora {out}; Ollama: ADAPTER {out})")
    return out


def _gguf_model(src: TrainedSource, path: str | Path, out: Path, outtype: str, from_nf4: bool,
                device: str) -> Path:
    """Merge into a scratch directory beside the output (same disk, removed afterwards, also on
    error), convert it to one GGUF file named after the run, and write an Ollama Modelfile
    beside it."""
    from qdpo.export.gguf import export_gguf
    from qdpo.export.ollama import write_modelfile

    merged_dtype = "fp32" if outtype == "f32" else "bf16" if outtype == "bf16" else "fp16"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.merged-", dir=out.parent) as work:
        merged = Path(work) / "merged"
        merge(path, merged, dtype=merged_dtype, from_nf4=from_nf4, overwrite=True, device=device,
              trust_remote_code=src.recipe.model.trust_remote_code, quiet=True)
        export_gguf(merged, out, outtype=outtype, name=run_name(src))
        ui.info(f"GGUF model written to {out} ({outtype}); run it with llama.cpp "
                f"(llama-cli -m {out}) or Ollama (the Modelfile beside it)")
        write_modelfile(out, merged, src.recipe, run_name(src))
    return out
