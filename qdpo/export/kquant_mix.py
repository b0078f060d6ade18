"""llama-quantize's k-quant tensor mixes (Q4_K_M, Q5_K_M, Q6_K) for GGUF export, without numpy:
which GGML type each tensor of a dense llama / qwen2 model gets, as ``llama_tensor_get_type``
in llama.cpp's ``llama-quant.cpp`` decides it when no importance matrix is given. The
quantizers themselves are in `qdpo.export.kquants`.
"""

from __future__ import annotations

import re
from typing import Any

QK_K = 256
K_OUTTYPES = ("q4_k_m", "q5_k_m", "q6_k")


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's rule for the layers whose attn_v / ffn_down get more bits."""
    return (i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8
            or (i_layer - n_layers // 8) % 3 == 2)


def ktype_for(gguf: Any, name: str, shape: tuple[int, ...], outtype: str, n_layers: int,
              has_output: bool) -> Any:
    """The GGML type of a 2-D ``*.weight`` tensor under a k-quant outtype.

    As ``llama_tensor_get_type`` for Q4_K_M / Q5_K_M / Q6_K without an imatrix: ``output``
    (and ``token_embd`` when there is no separate output, i.e. tied embeddings) is Q6_K, or
    Q8_0 if its rows are not whole super-blocks; for _m, ``attn_v`` and ``ffn_down`` of the
    layers picked by `use_more_bits` are Q6_K; everything else is the base type (Q4_K, Q5_K,
    Q6_K). A tensor whose rows are not a multiple of 256 falls back as llama.cpp does: Q4_K ->
    Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and F16 when the rows are not a multiple of 32 either.
    """
    Q = gguf.GGMLQuantizationType
    base = {"q4_k_m": Q.Q4_K, "q5_k_m": Q.Q5_K, "q6_k": Q.Q6_K}[outtype]
    row = shape[-1]
    if name == "output.weight" or (not has_output and name == "token_embd.weight"):
        return Q.Q6_K if row % QK_K == 0 else Q.Q8_0
    qtype = base
    layer = _layer_of(name)
    if (outtype != "q6_k" and layer is not None and (".attn_v." in name or ".ffn_down" in name)
            and use_more_bits(layer, n_layers)):
        qtype = Q.Q6_K
    if row % QK_K == 0:
        return qtype
    fallback = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}[qtype]
    return fallback if row % 32 == 0 else Q.F16


def _layer_of(name: str) -> int | None:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def file_type(gguf: Any, outtype: str) -> Any:
    T = gguf.LlamaFileType
    return {"q4_k_m": T.MOSTLY_Q4_K_M, "q5_k_m": T.MOSTLY_Q5_K_M, "q6_k": T.MOSTLY_Q6_K}[outtype]
