"""What the GGUF model and LoRA exports share: the architecture table, tensor types, the tensor
plan and the writer that streams it to disk.

Both follow llama.cpp's own converters (``convert_hf_to_gguf.py`` and
``convert_lora_to_gguf.py``):

* Tensor names come from gguf-py's ``TensorNameMap`` for the architecture (``token_embd``,
  ``blk.N.attn_q`` ... ``output``), exactly as ``ModelBase.map_tensor_name`` does.
* For the ``llama`` architecture (LlamaForCausalLM and MistralForCausalLM) the q/k projection
  rows are permuted from Hugging Face's rotate-half RoPE layout to llama.cpp's interleaved one
  (``LlamaModel.permute(w, n_head, n_head)`` for q, ``permute(w, n_head, n_head_kv)`` for k,
  weights and biases alike). ``qwen2`` uses NeoX-style RoPE in llama.cpp and is not permuted.
* Tensor types follow ``ModelBase.prepare_tensors``: 1-D tensors and ``*_norm.weight`` are
  F32, everything else takes the requested type; Q8_0 needs rows that are a multiple of 32 and
  falls back to F16 otherwise (llama.cpp catches ``QuantError`` and does the same).
* The k-quant outtypes ``q4_k_m``, ``q5_k_m`` and ``q6_k`` are what ``llama-quantize`` writes
  for Q4_K_M / Q5_K_M / Q6_K (no importance matrix): the per-tensor mix and the numpy
  quantizers are in `qdpo.export.kquants`.

Memory stays bounded: tensors are planned from the safetensors headers, the GGUF header is
written first, and then tensors are read, converted and written one at a time, shard by shard.
The file is written under a temporary name next to the target (``qdpo.files``) and renamed at
the end, so a failed export leaves the old file, or none, and no temporary behind.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from qdpo.errors import QdpoError
from qdpo.export.kquant_mix import K_OUTTYPES, ktype_for
from qdpo.files import write_atomically

GGUF_MISSING = "GGUF export needs the gguf package: pip install 'qdpo[gguf]'"

OUTTYPES = ("f32", "f16", "bf16", "q8_0") + K_OUTTYPES

Q8_0_BLOCK = 32

# HF architecture -> (gguf arch name, whether q/k get llama.cpp's RoPE permutation)
ARCHS: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM"}


def load_gguf() -> Any:
    """The gguf package, or a QdpoError saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise QdpoError(GGUF_MISSING) from None
    return gguf


def permute_qk(weights: Any, n_head: int, n_head_kv: int | None) -> Any:
    """llama.cpp's ``LlamaModel.permute``: HF rotate-half q/k rows -> interleaved RoPE rows.

    Works on numpy arrays (weights, biases, LoRA B matrices: only the first axis is touched).
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise QdpoError(f"{what} not found: {path}") from None
    except (OSError, ValueError) as e:
        raise QdpoError(f"Cannot read {what} {path}: {e}") from None
    if not isinstance(data, dict):
        raise QdpoError(f"{what} {path} is not a JSON object")
    return data


def check_outtype(outtype: str) -> str:
    o = str(outtype).lower()
    if o not in OUTTYPES:
        raise QdpoError(f"Unknown GGUF outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    return o


def resolve_arch(config: dict[str, Any]) -> tuple[str, str, bool]:
    """(HF architecture, gguf arch name, permute q/k) for a config, or a QdpoError."""
    archs = config.get("architectures") or []
    hf_arch = next((a for a in archs if a in ARCHS), None)
    if hf_arch is None and not archs:
        hf_arch = _MODEL_TYPES.get(str(config.get("model_type")))
    if hf_arch is None:
        found = ", ".join(archs) if archs else f"model_type {config.get('model_type')!r}"
        raise QdpoError(f"GGUF export does not support {found}; supported: "
                        f"{', '.join(ARCHS)}.")
    name, permute = ARCHS[hf_arch]
    return hf_arch, name, permute


def tensor_name_map(gguf: Any, arch_name: str, n_blocks: int) -> Any:
    """gguf-py's HF -> llama.cpp tensor name map for the architecture."""
    for enum, name in gguf.MODEL_ARCH_NAMES.items():
        if name == arch_name:
            return gguf.get_tensor_name_map(enum, n_blocks)
    raise QdpoError(f"The installed gguf package does not know the {arch_name!r} architecture; "
                    "upgrade it: pip install -U gguf")


def heads(config: dict[str, Any]) -> tuple[int, int, int]:
    """(n_head, n_head_kv, head_dim)."""
    try:
        n_head = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
    except (KeyError, TypeError, ValueError):
        raise QdpoError("The model config lacks num_attention_heads / hidden_size") from None
    n_kv = int(config.get("num_key_value_heads") or n_head)
    head_dim = int(config.get("head_dim") or hidden // n_head)
    return n_head, n_kv, head_dim


def qtype_for(gguf: Any, name: str, shape: tuple[int, ...], outtype: str, n_layers: int = 0,
              has_output: bool = True) -> Any:
    """The GGML type a tensor gets, as in llama.cpp's ModelBase.prepare_tensors (and, for the
    k-quant outtypes, llama-quantize's mix: n_layers and has_output are used only there)."""
    Q = gguf.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return Q.F32
    if not name.endswith((".weight", ".lora_a", ".lora_b")):
        return Q.F32
    if outtype in K_OUTTYPES:
        return ktype_for(gguf, name, shape, outtype, n_layers, has_output)
    if outtype == "f32":
        return Q.F32
    if outtype == "f16":
        return Q.F16
    if outtype == "bf16":
        return Q.BF16
    # q8_0: llama.cpp's quantize raises QuantError on rows that are not whole blocks -> F16
    return Q.Q8_0 if shape[-1] % Q8_0_BLOCK == 0 else Q.F16


def to_f32(t: Any) -> Any:
    """A torch tensor as a float32 numpy array; integer (quantized) tensors are refused."""
    import torch

    if not (t.is_floating_point()):
        raise QdpoError(f"Tensor of dtype {t.dtype} cannot be exported (quantized checkpoint? "
                        "export a merged model with full-precision weights)")
    return t.to(torch.float32).numpy()


@dataclass
class Planned:
    """One output tensor: its GGUF name, shape (numpy order), type and how to produce it."""

    name: str
    shape: tuple[int, ...]
    qtype: Any
    source: str | None  # shard path the data comes from (None: generated)
    produce: Callable[[Any], Any]  # (open shard or None) -> float32 numpy array


def _nbytes(gguf: Any, shape: tuple[int, ...], qtype: Any) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = math.prod(shape)
    return n // block * type_size


def write_gguf(gguf: Any, writer: Any, plan: list[Planned], out_path: Path) -> Path:
    """Write header, metadata and the planned tensors (one at a time) atomically to out_path."""
    import numpy as np

    out_path = Path(out_path)
    if out_path.is_dir():
        raise QdpoError(f"GGUF output path {out_path} is a directory; give a file name")
    for p in plan:
        writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32),
                               _nbytes(gguf, p.shape, p.qtype), raw_dtype=p.qtype)
    with write_atomically(out_path) as tmp:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            _write_tensors(gguf, writer, plan)
        finally:
            writer.close()
    return out_path


def _write_tensors(gguf: Any, writer: Any, plan: list[Planned]) -> None:
    import numpy as np

    with _shard_reader() as shard:
        for p in plan:
            data = p.produce(shard(p.source) if p.source is not None else None)
            data = np.ascontiguousarray(data, dtype=np.float32)
            if tuple(data.shape) != p.shape:
                raise QdpoError(f"Tensor {p.name}: expected shape {p.shape}, "
                                f"got {tuple(data.shape)}")
            arr = quantize(gguf, data, p.qtype)
            writer.write_tensor_data(np.ascontiguousarray(arr))
            del data, arr


def quantize(gguf: Any, data: Any, qtype: Any) -> Any:
    """float32 data as qtype's bytes: k-quants here, everything else by gguf-py."""
    Q = gguf.GGMLQuantizationType
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        from qdpo.export.kquants import quantize_k

        return quantize_k(data, qtype.name)
    return gguf.quants.quantize(data, qtype)


@contextlib.contextmanager
def _shard_reader() -> Iterator[Callable[[str], Any]]:
    """A function shard path -> open safetensors handle, keeping only the last shard open (the
    plan is ordered shard by shard)."""
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        current: list[Any] = [None, None]  # path, handle

        def shard(path: str) -> Any:
            if current[0] != path:
                stack.close()
                current[:] = [path, stack.enter_context(
                    safe_open(path, framework="pt", device="cpu"))]
            return current[1]

        yield shard
