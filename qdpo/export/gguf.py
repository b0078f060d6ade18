"""`export_gguf`: a merged Hugging Face model directory (safetensors shards, ``config.json``,
tokenizer files) as one GGUF model file for llama.cpp (and Ollama, LM Studio, ...).

Follows llama.cpp's ``convert_hf_to_gguf.py`` (``conversion/llama.py``, ``conversion/qwen.py``):
the tensor plan here, the ``{arch}.*`` hyperparameters and RoPE scaling here, the tokenizer in
`gguf_vocab`, names, types and the streaming writer in `gguf_common`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from qdpo.errors import QdpoError
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
from qdpo.export.gguf_vocab import add_vocab
from qdpo.export.kquant_mix import K_OUTTYPES, QK_K
from qdpo.export.kquant_mix import file_type as kquant_file_type

# HF tensors that carry nothing llama.cpp needs (same list as ModelBase.prepare_tensors)
_SKIP_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")
# per block, the tensors llama.cpp cannot load a llama / qwen2 model without
_BLOCK_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                  "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


def export_gguf(model_dir: str | Path, out_path: str | Path, outtype: str = "f16",
                name: str | None = None) -> Path:
    """Convert a merged Hugging Face model directory to one GGUF file llama.cpp can load.

    outtype: ``f32``, ``f16``, ``bf16``, ``q8_0`` or the k-quant mixes ``q4_k_m``, ``q5_k_m``,
    ``q6_k`` (norms and other 1-D tensors stay F32; q8_0 keeps matrices whose rows are not a
    multiple of 32 in F16; the k-quant mixes are llama-quantize's, see `kquants.ktype_for`).
    name: ``general.name``
    (default: the model directory's name). Returns the output path.
    Raises QdpoError for anything the user can fix (missing gguf, unsupported architecture or
    tokenizer, incomplete model); a failed export leaves an existing ``out_path`` as it was (or
    none) and no temporary file.
    """
    gguf = load_gguf()
    outtype = check_outtype(outtype)
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise QdpoError(f"Model directory not found: {model_dir}")
    config = read_json(model_dir / "config.json", "model config")
    _, arch_name, permute = resolve_arch(config)
    plan = _plan_model(gguf, config, arch_name, permute, _shards(model_dir), outtype)

    writer = gguf.GGUFWriter(path=None, arch=arch_name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or model_dir.resolve().name)
    rope, head_dim = _add_hparams(gguf, writer, config, arch_name, outtype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(gguf, writer, model_dir, config, arch_name)

    if arch_name == "llama" and str(rope.get("rope_type", "")).lower() == "llama3":
        factors = _llama3_rope_factors(config, rope, head_dim)
        plan.insert(0, Planned("rope_freqs.weight", tuple(factors.shape),
                               gguf.GGMLQuantizationType.F32, None,
                               lambda _h, v=factors: v))
    return write_gguf(gguf, writer, plan, Path(out_path))


# --------------------------------------------------------------------------- tensor plan


def _shards(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise QdpoError(f"{index} has no weight_map")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise QdpoError(f"Missing model shards in {model_dir}: {', '.join(missing)}")
        return [model_dir / n for n in names]
    parts = sorted(p for p in model_dir.glob("model*.safetensors") if p.is_file())
    if not parts:
        hint = (" (only PyTorch .bin weights found; re-save with safe_serialization=True)"
                if any(model_dir.glob("pytorch_model*.bin")) else "")
        raise QdpoError(f"No safetensors weights in {model_dir}{hint}")
    return parts


def _plan_model(gguf: Any, config: dict[str, Any], arch_name: str, permute: bool,
                shards: list[Path], outtype: str) -> list[Planned]:
    """One Planned tensor per checkpoint tensor, read from the safetensors headers only."""
    from safetensors import safe_open

    n_head, n_kv, _ = heads(config)
    n_blocks = int(config["num_hidden_layers"])
    tensor_map = tensor_name_map(gguf, arch_name, n_blocks)
    tied = bool(config.get("tie_word_embeddings", False))
    plan: list[Planned] = []
    seen: dict[str, str] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key.endswith(_SKIP_SUFFIXES):
                    continue
                if tied and key == "lm_head.weight":
                    continue  # llama.cpp reuses token_embd when there is no output.weight
                new_name = _gguf_name(tensor_map, key, shard, arch_name, seen)
                shape = tuple(int(d) for d in f.get_slice(key).get_shape())
                perm = _qk_perm(key, shape, permute, n_head, n_kv)
                plan.append(Planned(new_name, shape, None, str(shard), _producer(key, perm)))
    _check_complete(seen, n_blocks)
    has_output = "output.weight" in seen  # else token_embd is the output (k-quant mixes)
    for p in plan:
        p.qtype = qtype_for(gguf, p.name, p.shape, outtype, n_blocks, has_output)
    _say_fallbacks(gguf, plan, outtype)
    return plan


def _say_fallbacks(gguf: Any, plan: list[Any], outtype: str) -> None:
    """A k-quant mix on a model whose rows are not whole 256-value super-blocks (small models)
    quantizes those tensors with other types, as llama-quantize does: say so, not silently."""
    from qdpo import console as ui

    if outtype not in K_OUTTYPES:
        return
    Q = gguf.GGMLQuantizationType
    k_types = {Q.Q4_K, Q.Q5_K, Q.Q6_K}
    quantized = [p for p in plan if p.qtype not in (Q.F32,)]
    other = [p for p in quantized if p.qtype not in k_types]
    if other:
        kinds = sorted({p.qtype.name for p in other})
        ui.warn(f"{len(other)} of {len(quantized)} tensors are not {outtype}: their rows are "
                f"not multiples of {QK_K} values, so they are {', '.join(kinds)} instead (as "
                "llama-quantize does; larger models have whole super-blocks)")


def _gguf_name(tensor_map: Any, key: str, shard: Path, arch_name: str,
               seen: dict[str, str]) -> str:
    """The llama.cpp name of HF tensor `key`, recorded in `seen` (a clash is an error)."""
    new_name = tensor_map.get_name(key, try_suffixes=(".weight", ".bias"))
    if new_name is None:
        raise QdpoError(f"Cannot map tensor {key!r} of {shard.name} to a llama.cpp "
                        f"{arch_name} tensor (not a plain merged {arch_name} checkpoint?)")
    if new_name in seen:
        raise QdpoError(f"Tensors {seen[new_name]!r} and {key!r} both map to {new_name}")
    seen[new_name] = key
    return new_name


def _qk_perm(key: str, shape: tuple[int, ...], permute: bool, n_head: int,
             n_kv: int) -> tuple[int, int] | None:
    """permute_qk's head counts for a q/k projection of a permuted architecture, else None."""
    perm: tuple[int, int] | None = None
    if permute and key.endswith(("q_proj.weight", "q_proj.bias")):
        perm = (n_head, n_head)
    elif permute and key.endswith(("k_proj.weight", "k_proj.bias")):
        perm = (n_head, n_kv)
    if perm is not None and shape[0] % (perm[1] * 2) != 0:
        raise QdpoError(f"{key} has {shape[0]} rows, not divisible into "
                        f"{perm[1]} heads of even size")
    return perm


def _producer(key: str, perm: tuple[int, int] | None) -> Any:
    def produce(h: Any) -> Any:
        data = to_f32(h.get_tensor(key))
        if perm is not None:
            data = permute_qk(data, *perm)
        return data

    return produce


def _check_complete(seen: dict[str, str], n_blocks: int) -> None:
    required = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{t}.weight" for i in range(n_blocks) for t in _BLOCK_TENSORS]
    missing = [r for r in required if r not in seen]
    if missing:
        raise QdpoError(f"The model is missing tensors llama.cpp needs: {', '.join(missing[:6])}"
                        + (" ..." if len(missing) > 6 else ""))


# --------------------------------------------------------------------------- hyperparameters


def _rope_params(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 ``rope_parameters`` or transformers 4 ``rope_scaling`` + ``rope_theta``."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "full_attention" in params and isinstance(params["full_attention"], dict):
        params = dict(params["full_attention"])
    if "rope_theta" not in params and config.get("rope_theta") is not None:
        params["rope_theta"] = config["rope_theta"]
    if "rope_type" not in params and params.get("type") is not None:
        params["rope_type"] = params["type"]
    return params


def _llama3_rope_factors(config: dict[str, Any], rope: dict[str, Any], head_dim: int) -> Any:
    """``rope_freqs.weight`` for rope_type llama3, as LlamaModel.generate_extra_tensors."""
    import numpy as np

    base = float(rope.get("rope_theta", 10000.0))
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings",
                             config.get("original_max_position_embeddings", 8192)))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / float(freq)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _file_type(gguf: Any, outtype: str) -> Any:
    T = gguf.LlamaFileType
    if outtype in K_OUTTYPES:
        return kquant_file_type(gguf, outtype)
    return {"f32": T.ALL_F32, "f16": T.MOSTLY_F16, "bf16": T.MOSTLY_BF16,
            "q8_0": T.MOSTLY_Q8_0}[outtype]


def _add_hparams(gguf: Any, writer: Any, config: dict[str, Any], arch_name: str,
                 outtype: str) -> tuple[dict[str, Any], int]:
    """The {arch}.* keys (TextModel/LlamaModel/Qwen2Model.set_gguf_parameters)."""
    n_head, n_kv, head_dim = heads(config)
    writer.add_block_count(int(config["num_hidden_layers"]))
    if config.get("max_position_embeddings") is not None:
        writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    rope = _rope_params(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    if config.get("head_dim") is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(_file_type(gguf, outtype))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_rope_dimension_count(head_dim)
    _add_rope_scaling(gguf, writer, rope, arch_name)
    return rope, head_dim


def _add_rope_scaling(gguf: Any, writer: Any, rope: dict[str, Any], arch_name: str) -> None:
    rope_type = str(rope.get("rope_type") or "default").lower()
    factor = rope.get("factor")
    if rope_type == "default":
        pass
    elif rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    elif rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(factor))
        orig = rope.get("original_max_position_embeddings")
        if orig is not None:
            writer.add_rope_scaling_orig_ctx_len(int(orig))
    elif rope_type == "llama3" and arch_name == "llama":
        pass  # written as the rope_freqs.weight tensor
    else:
        raise QdpoError(f"GGUF export does not support rope type {rope_type!r} for {arch_name}")
