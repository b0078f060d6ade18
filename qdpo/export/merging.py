"""Merge the adapter into a full-precision base: one standard transformers model directory.

Merging never happens into 4-bit weights (rounding the merged weights back to NF4 would undo
most of what the adapter learned). By default the base is reloaded from its original
checkpoint in bf16/fp16/fp32; `from_nf4` instead dequantizes the NF4 base the adapter was
trained against, which reproduces the trained model's behaviour exactly at the cost of carrying
the quantization error into the merged weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qdpo import console as ui
from qdpo.errors import QdpoError
from qdpo.export.card import model_card
from qdpo.export.output import check_out, source_root
from qdpo.files import atomic_dir
from qdpo.rundir import TrainedSource, open_trained

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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


def _check_memory(src: TrainedSource, dtype: str, from_nf4: bool, dev: torch.device) -> None:
    """Say how much memory the merge needs, and refuse a CPU merge that cannot fit."""
    n = count_params(src.base_path, src.recipe)
    need = n * torch.finfo(DTYPES[dtype]).bits // 8
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


def _merged_model(src: TrainedSource, dtype: str, from_nf4: bool, dev: torch.device) -> Any:
    from peft import PeftModel

    from qdpo.model import load_base

    if from_nf4:
        base = load_base(src.recipe, dev, quantize=True, dtype=torch.float32)
        base = dequantize_base(base, DTYPES[dtype])
    else:
        base = load_base(src.recipe, dev, quantize=False, dtype=DTYPES[dtype])
    merged = PeftModel.from_pretrained(base, str(src.adapter_dir)).merge_and_unload()
    merged.config.use_cache = True
    return merged


def _tokenizer(src: TrainedSource) -> Any:
    """The tokenizer saved with the adapter, else the one the recipe names."""
    from qdpo.model import load_tokenizer

    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(src.adapter_dir))
    except Exception:
        return load_tokenizer(src.recipe)


def _merged_card(src: TrainedSource, out: Path, dtype: str, from_nf4: bool) -> str:
    how = ("the NF4-dequantized base it was trained against" if from_nf4 else
           f"the original base weights in {dtype}")
    return model_card(src, (
        f"This is the adapter merged into {how}: a standard transformers model.\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"model = AutoModelForCausalLM.from_pretrained('{out}')\n"
        f"tok = AutoTokenizer.from_pretrained('{out}')\n```"), library="transformers")


def merge(path: str | Path, out: str | Path, dtype: str = "bf16", from_nf4: bool = False,
          overwrite: bool = False, device: str = "cpu", trust_remote_code: bool = False,
          quiet: bool = False) -> Path:
    """Write base + adapter as one standard transformers model directory.

    Written whole or not at all: an existing output is replaced only once the new one is
    complete, and a failure leaves no temporary directory behind."""
    src = open_trained(path, trust_remote_code=trust_remote_code)
    out = Path(out)
    check_out(out, overwrite, source_root(src))
    if dtype not in DTYPES:
        raise QdpoError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    dev = torch.device(device)
    _check_memory(src, dtype, from_nf4, dev)
    merged = _merged_model(src, dtype, from_nf4, dev)
    with atomic_dir(out) as tmp:
        merged.save_pretrained(str(tmp), max_shard_size="5GB")
        _tokenizer(src).save_pretrained(str(tmp))
        (tmp / "README.md").write_text(_merged_card(src, out, dtype, from_nf4))
    if not quiet:  # a GGUF export's scratch merge is no output of the user's
        ui.info(f"merged model written to {out}")
    return out
