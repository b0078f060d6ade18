"""`export_gguf_lora`: a peft LoRA adapter directory as llama.cpp's GGUF LoRA adapter
(``llama-cli -m base.gguf --lora adapter.gguf``), following ``convert_lora_to_gguf.py``.

Tensors are named ``blk.N.attn_q.weight.lora_a`` / ``.lora_b`` with peft's shapes (A: rank x in,
B: out x rank, numpy order); for the llama architecture lora_b of q/k gets the same row
permutation as the base weights. llama.cpp scales an adapter by ``adapter.lora.alpha / rank``;
the alpha written makes that equal peft's scale, and what one alpha cannot express (per-module
alpha_pattern) is folded into that module's lora_b.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qdpo.errors import QdpoError
from qdpo.export.kquant_mix import K_OUTTYPES
from qdpo.export.gguf_common import (
    Planned,
    check_outtype,
    heads,
    load_gguf,
    permute_qk,
    qtype_for,
    read_json,
    resolve_arch,
    tensor_name_map,
    to_f32,
    write_gguf,
)

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")

# module -> {"A": (safetensors key, shape), "B": (...)}
_Pairs = dict[str, dict[str, tuple[str, tuple[int, ...]]]]


def export_gguf_lora(adapter_dir: str | Path, out_path: str | Path,
                     base_config: dict | None = None, outtype: str = "f16",
                     name: str | None = None) -> Path:
    """Convert a peft LoRA adapter directory to a llama.cpp GGUF LoRA adapter.

    Tensors are named ``blk.N.attn_q.weight.lora_a`` / ``.lora_b`` with peft's shapes
    (A: rank x in, B: out x rank, numpy order); for the llama architecture lora_b of q/k gets the
    same row permutation as the base weights. ``adapter.lora.alpha`` is written so that
    llama.cpp's scale ``alpha / rank`` equals peft's: ``lora_alpha`` normally,
    ``lora_alpha * sqrt(r)`` with rsLoRA. Modules whose rank or alpha differ from the global
    ones (rank_pattern / alpha_pattern) have the scale difference folded into lora_b.

    base_config: the base model's config.json as a dict; default: read from the adapter's
    ``base_model_name_or_path`` when that is a local directory. name: ``general.name``
    (default: the adapter directory's name).
    A failed export leaves an existing ``out_path`` as it was (or none) and no temporary file.
    """
    gguf = load_gguf()
    outtype = check_outtype(outtype)
    if outtype in K_OUTTYPES:
        raise QdpoError(f"outtype {outtype} is a mix for a merged model; a GGUF LoRA adapter is "
                        "written as f32, f16, bf16 or q8_0")
    adapter_dir = Path(adapter_dir)
    acfg, weights = _read_adapter(adapter_dir)
    config = _base_config_for(acfg, adapter_dir, base_config)
    _, arch_name, permute = resolve_arch(config)
    target = _Target.of(gguf, config, arch_name, permute)
    scale = _Scale.of(acfg)
    plan = _plan_lora(gguf, _pair_tensors(weights), target, scale, str(weights), outtype)
    writer = gguf.GGUFWriter(path=None, arch=arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_name(name or adapter_dir.resolve().name)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(scale.alpha_written))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return write_gguf(gguf, writer, plan, Path(out_path))


# --------------------------------------------------------------------------- reading the adapter


def _read_adapter(adapter_dir: Path) -> tuple[dict[str, Any], Path]:
    """(adapter_config.json, the weights file) of a plain LoRA adapter llama.cpp can apply."""
    if not adapter_dir.is_dir():
        raise QdpoError(f"Adapter directory not found: {adapter_dir}")
    acfg = read_json(adapter_dir / "adapter_config.json", "adapter config")
    if str(acfg.get("peft_type", "LORA")).upper() != "LORA":
        raise QdpoError(f"GGUF LoRA export needs a LoRA adapter, not {acfg.get('peft_type')}")
    if acfg.get("use_dora"):
        raise QdpoError("llama.cpp does not support DoRA adapters; merge the adapter and use "
                        "export_gguf on the merged model instead")
    if acfg.get("lora_bias") or acfg.get("bias", "none") not in (None, "none"):
        raise QdpoError("llama.cpp LoRA adapters cannot carry biases (lora_bias / bias); merge "
                        "the adapter and export the merged model instead")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise QdpoError(f"No adapter_model.safetensors in {adapter_dir}")
    return acfg, weights


def _base_config_for(adapter_cfg: dict[str, Any], adapter_dir: Path,
                     base_config: dict[str, Any] | None) -> dict[str, Any]:
    if base_config is not None:
        return dict(base_config)
    base = adapter_cfg.get("base_model_name_or_path")
    if base:
        p = Path(base)
        if not p.is_absolute() and not p.exists():
            p = adapter_dir / base
        if (p / "config.json").is_file():
            return read_json(p / "config.json", "base model config")
        try:  # a hub id whose config is already in the local cache
            from transformers import AutoConfig

            return AutoConfig.from_pretrained(str(base), local_files_only=True).to_dict()
        except Exception:  # noqa: BLE001 - fall through to the explanation below
            pass
    raise QdpoError(
        "GGUF LoRA export needs the base model's config (model type and head counts): "
        f"the adapter names base model {base!r}, which is not a local directory with a "
        "config.json (nor a cached hub model). Pass base_config=... (the base config.json "
        "as a dict).")


def _pair_tensors(weights: Path) -> _Pairs:
    """lora_A and lora_B of each module, from the safetensors header only."""
    from safetensors import safe_open

    modules: _Pairs = {}
    with safe_open(str(weights), framework="pt", device="cpu") as f:
        for key in f.keys():
            m = _LORA_KEY.match(key)
            if m is None:
                raise _unexpected_tensor(key)
            shape = tuple(int(d) for d in f.get_slice(key).get_shape())
            modules.setdefault(m.group("module"), {})[m.group("ab")] = (key, shape)
    return modules


def _unexpected_tensor(key: str) -> QdpoError:
    if "lora_embedding_" in key:
        return QdpoError("LoRA on the token embeddings is not supported by the GGUF LoRA export; "
                         "merge the adapter and export the merged model")
    if "lora_magnitude_vector" in key:
        return QdpoError("llama.cpp does not support DoRA adapters")
    return QdpoError(f"Unexpected tensor {key!r} in the adapter (modules_to_save or trainable "
                     "tokens?); llama.cpp LoRA adapters hold only lora_A/B. Merge the adapter "
                     "and export the merged model instead.")


# --------------------------------------------------------------------------- scale and names


def _lora_pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


@dataclass
class _Scale:
    """peft's per-module LoRA scale against the one alpha a GGUF adapter carries."""

    alpha: float
    rslora: bool
    rank_pattern: dict[str, Any]
    alpha_pattern: dict[str, Any]
    alpha_written: float  # adapter.lora.alpha

    @classmethod
    def of(cls, acfg: dict[str, Any]) -> _Scale:
        r = int(acfg.get("r") or 8)
        alpha = float(acfg.get("lora_alpha") or r)
        rslora = bool(acfg.get("use_rslora", False))
        return cls(alpha, rslora, acfg.get("rank_pattern") or {},
                   acfg.get("alpha_pattern") or {}, alpha * math.sqrt(r) if rslora else alpha)

    def fold(self, module: str, rank: int) -> float:
        """What lora_b is multiplied by so llama.cpp's alpha_written / rank is peft's scale:
        1.0 unless the rank or alpha patterns differ."""
        if rank != int(_lora_pattern_value(self.rank_pattern, module, rank)):
            raise QdpoError(f"Adapter module {module}: rank {rank} disagrees with adapter_config")
        m_alpha = float(_lora_pattern_value(self.alpha_pattern, module, self.alpha))
        peft_scale = m_alpha / (math.sqrt(rank) if self.rslora else rank)
        return peft_scale * rank / self.alpha_written


@dataclass
class _Target:
    """The base architecture the adapter is applied to: names, q/k permutation, tied head."""

    tensor_map: Any
    arch_name: str
    permute: bool
    n_head: int
    n_kv: int
    tied: bool

    @classmethod
    def of(cls, gguf: Any, config: dict[str, Any], arch_name: str, permute: bool) -> _Target:
        n_head, n_kv, _ = heads(config)
        n_blocks = int(config.get("num_hidden_layers") or 0)
        return cls(tensor_name_map(gguf, arch_name, n_blocks), arch_name, permute, n_head, n_kv,
                   bool(config.get("tie_word_embeddings", False)))

    def gguf_name(self, module: str) -> str:
        base_name = module + ".weight"
        if base_name == "lm_head.weight" and self.tied:
            raise QdpoError("The adapter targets lm_head, but the base model ties it to the "
                            "embeddings, which llama.cpp LoRA adapters cannot express")
        new_name = self.tensor_map.get_name(base_name, try_suffixes=(".weight",))
        if new_name is None:
            raise QdpoError(f"Cannot map adapter module {module!r} to a llama.cpp "
                            f"{self.arch_name} tensor")
        return new_name

    def perm(self, module: str) -> tuple[int, int] | None:
        if self.permute and module.endswith("q_proj"):
            return (self.n_head, self.n_head)
        if self.permute and module.endswith("k_proj"):
            return (self.n_head, self.n_kv)
        return None


# --------------------------------------------------------------------------- plan


def _plan_lora(gguf: Any, modules: _Pairs, target: _Target, scale: _Scale, weights: str,
               outtype: str) -> list[Planned]:
    plan: list[Planned] = []
    for module, ab in modules.items():
        (key_a, shape_a), (key_b, shape_b) = _check_pair(module, ab)
        new_name = target.gguf_name(module)
        fold = scale.fold(module, shape_a[0])
        for suffix, shape, produce in (
                (".lora_a", shape_a, _produce_a(key_a)),
                (".lora_b", shape_b, _produce_b(key_b, target.perm(module), fold))):
            name = new_name + suffix
            plan.append(Planned(name, shape, qtype_for(gguf, name, shape, outtype), weights,
                                produce))
    if not plan:
        raise QdpoError(f"No LoRA tensors in {weights}")
    return plan


def _check_pair(module: str, ab: dict[str, tuple[str, tuple[int, ...]]]) -> tuple[Any, Any]:
    if set(ab) != {"A", "B"}:
        raise QdpoError(f"Adapter module {module} has lora_{''.join(ab)} but not both A and B")
    shape_a, shape_b = ab["A"][1], ab["B"][1]
    if len(shape_a) != 2 or len(shape_b) != 2 or shape_a[0] != shape_b[1]:
        raise QdpoError(f"Adapter module {module}: lora_A {shape_a} and lora_B {shape_b} do "
                        "not form a LoRA pair")
    return ab["A"], ab["B"]


def _produce_a(key: str) -> Any:
    def produce(h: Any) -> Any:
        return to_f32(h.get_tensor(key))

    return produce


def _produce_b(key: str, perm: tuple[int, int] | None, fold: float) -> Any:
    import numpy as np

    def produce(h: Any) -> Any:
        data = to_f32(h.get_tensor(key))
        if not math.isclose(fold, 1.0, rel_tol=1e-9):
            data = data * np.float32(fold)
        if perm is not None:
            data = permute_qk(data, *perm)
        return data

    return produce
