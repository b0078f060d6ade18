"""After training: merge the adapter into a full-precision base, and export to other formats.

Merging never happens into 4-bit weights (rounding the merged weights back to NF4 would undo
most of what the adapter learned). By default the base is reloaded from its original
checkpoint in bf16/fp16/fp32; `from_nf4` instead dequantizes the NF4 base the adapter was
trained against, which reproduces the trained model's behaviour exactly at the cost of carrying
the quantization error into the merged weights.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from qdpo import console as ui
from qdpo.errors import QdpoError, RunDirError
from qdpo.rundir import TrainedSource, open_trained

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FORMATS = ("peft", "gguf", "gguf-lora")


def _check_out(out: Path, overwrite: bool, source: Path | None = None) -> None:
    if source is not None:
        o, src = out.resolve(), source.resolve()
        if o == src or o in src.parents or src in o.parents:
            raise RunDirError(f"Output '{out}' overlaps the run or adapter it is made from "
                              f"('{source}'); choose a path outside it.")
    if out.exists() and (out.is_file() or any(out.iterdir())):
        if not overwrite:
            raise RunDirError(f"Output '{out}' already exists; pass --overwrite to replace it or "
                              "choose another path.")


def _replace(tmp: Path, out: Path) -> None:
    if out.exists():
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    tmp.rename(out)


def _tmp_for(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    return tmp


def available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def count_params(base_path: str, recipe: Any) -> int:
    from transformers import AutoModelForCausalLM

    from qdpo.model import load_config

    cfg = load_config(base_path, recipe)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in m.parameters())


def dequantize_base(model: Any, dtype: torch.dtype) -> Any:
    """Replace every bitsandbytes Linear4bit with an nn.Linear holding its dequantized weight."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                w = F.dequantize_4bit(child.weight.data, child.weight.quant_state).to(dtype)
                lin = torch.nn.Linear(child.in_features, child.out_features,
                                      bias=child.bias is not None, dtype=dtype, device=w.device)
                lin.weight.data = w
                if child.bias is not None:
                    lin.bias.data = child.bias.data.to(dtype)
                setattr(module, name, lin)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    model.is_quantized = False
    model.is_loaded_in_4bit = False
    return model


def model_card(src: TrainedSource, extra: str = "") -> str:
    r = src.recipe
    lines = [f"# {src.adapter_dir.resolve().name}", "",
             f"Fine-tuned from `{src.base_path}` with [qdpo](https://pypi.org/project/qdpo/) "
             f"(QLoRA preference optimisation).", "",
             "| | |", "|---|---|",
             f"| base model | `{src.base_path}` |",
             f"| loss | {', '.join(r.loss_types)} (beta {r.loss.beta}) |",
             f"| LoRA | r={r.lora.r}, alpha={r.lora.alpha}, targets {r.lora.target_modules} |",
             f"| quantization during training | {r.model.quantization} |"]
    if src.run is not None:
        try:
            summary = json.loads((src.run.path / "summary.json").read_text())
            ev = summary.get("eval") or {}
            if ev:
                lines.append(f"| held-out reward accuracy | {ev.get('rewards/accuracies', 0):.3f}"
                             f" ({int(ev.get('pairs', 0))} pairs) |")
                lines.append(f"| held-out reward margin | {ev.get('rewards/margins', 0):.3f} |")
            lines.append(f"| optimizer steps | {summary.get('steps')} |")
        except (OSError, json.JSONDecodeError):
            pass
    lines += ["", extra] if extra else []
    return "\n".join(lines) + "\n"


def merge(path: str | Path, out: str | Path, dtype: str = "bf16", from_nf4: bool = False,
          overwrite: bool = False, device: str = "cpu") -> Path:
    """Write base + adapter as one standard transformers model directory."""
    from peft import PeftModel

    from qdpo.model import load_base

    src = open_trained(path)
    out = Path(out)
    _check_out(out, overwrite, src.run.path if src.run else src.adapter_dir)
    if dtype not in DTYPES:
        raise QdpoError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    tdtype = DTYPES[dtype]
    dev = torch.device(device)
    n = count_params(src.base_path, src.recipe)
    need = n * torch.finfo(tdtype).bits // 8
    if from_nf4:
        need += n // 2
    avail = available_memory()
    count = f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"
    size = f"{need / 2**30:.1f} GiB" if need >= 2**30 else f"{need / 2**20:.0f} MiB"
    ui.info(f"merge: {count} parameters in {dtype} need about {size} of "
            f"{'RAM' if dev.type == 'cpu' else 'GPU memory'}"
            + (f" ({avail / 2**30:.1f} GiB available)" if avail and dev.type == "cpu" else ""))
    if avail and dev.type == "cpu" and need > avail * 1.05:
        raise QdpoError(f"Not enough memory to merge on the CPU: about {need / 2**30:.1f} GiB "
                        f"needed, {avail / 2**30:.1f} GiB available. Free memory, use "
                        "--device cuda, or export the adapter instead (qdpo export --format "
                        "peft / gguf-lora).")
    if from_nf4:
        base = load_base(src.recipe, dev, quantize=True, dtype=torch.float32)
        base = dequantize_base(base, tdtype)
    else:
        base = load_base(src.recipe, dev, quantize=False, dtype=tdtype)
    model = PeftModel.from_pretrained(base, str(src.adapter_dir))
    merged = model.merge_and_unload()
    merged.config.use_cache = True
    tmp = _tmp_for(out)
    try:
        merged.save_pretrained(str(tmp), max_shard_size="5GB")
        from qdpo.model import load_tokenizer

        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(src.adapter_dir))
        except Exception:
            tok = load_tokenizer(src.recipe)
        tok.save_pretrained(str(tmp))
        how = ("the NF4-dequantized base it was trained against" if from_nf4 else
               f"the original base weights in {dtype}")
        (tmp / "README.md").write_text(model_card(src, (
            f"This is the adapter merged into {how}: a standard transformers model.\n\n"
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"model = AutoModelForCausalLM.from_pretrained('{out}')\n"
            f"tok = AutoTokenizer.from_pretrained('{out}')\n```")))
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ui.info(f"merged model written to {out}")
    return out


def export_peft(path: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """A clean adapter directory: weights, config, tokenizer, model card."""
    src = open_trained(path)
    out = Path(out)
    _check_out(out, overwrite, src.run.path if src.run else src.adapter_dir)
    tmp = _tmp_for(out)
    tmp.mkdir()
    keep = ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
            "tokenizer.model", "vocab.json", "merges.txt")
    for name in keep:
        f = src.adapter_dir / name
        if f.exists():
            shutil.copy2(f, tmp / name)
    cfg = json.loads((tmp / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = src.base_path
    (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    (tmp / "README.md").write_text(model_card(src, (
        "A LoRA adapter in peft's format:\n\n```python\nfrom peft import AutoPeftModelForCausalLM"
        f"\nmodel = AutoPeftModelForCausalLM.from_pretrained('{out}')\n```")))
    _replace(tmp, out)
    ui.info(f"adapter written to {out}")
    return out


def export(path: str | Path, fmt: str, out: str | Path, outtype: str = "f16",
           overwrite: bool = False, from_nf4: bool = False, device: str = "cpu") -> Path:
    if fmt not in FORMATS:
        raise QdpoError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}.")
    out = Path(out)
    if fmt == "gguf-lora" and outtype not in ("f32", "f16", "bf16"):
        raise QdpoError(f"--outtype {outtype} is for a merged model (--format gguf); a GGUF "
                        "LoRA adapter is written as f16, bf16 or f32 (llama.cpp applies "
                        "adapters unquantized). Use --outtype f16.")
    if fmt == "peft":
        return export_peft(path, out, overwrite)
    from qdpo import gguf_export

    src = open_trained(path)
    _check_out(out, overwrite, src.run.path if src.run else src.adapter_dir)
    if fmt == "gguf-lora":
        from qdpo.model import load_config

        cfg = load_config(src.base_path, src.recipe).to_dict()
        gguf_export.export_gguf_lora(src.adapter_dir, out, base_config=cfg, outtype=outtype)
        ui.info(f"GGUF LoRA adapter written to {out}; use it on top of a GGUF of "
                f"{src.base_path} (llama.cpp: --lora {out}; Ollama: ADAPTER {out})")
        return out
    merged_dtype = "fp32" if outtype == "f32" else "bf16" if outtype == "bf16" else "fp16"
    work = _tmp_for(out.with_name(out.name + ".merged"))
    try:
        merge(path, work, dtype=merged_dtype, from_nf4=from_nf4, overwrite=True, device=device)
        gguf_export.export_gguf(work, out, outtype=outtype)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ui.info(f"GGUF model written to {out} ({outtype}); run it with llama.cpp "
            f"(llama-cli -m {out}) or Ollama (FROM {out})")
    return out
