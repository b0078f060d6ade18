"""GGUF k-quants in numpy: Q4_K, Q5_K and Q6_K blocks as llama.cpp's reference quantizers write
them.

The quantizers port llama.cpp's reference (no importance matrix) functions from
``ggml-quants.c``: ``quantize_row_q4_K_ref`` / ``quantize_row_q5_K_ref`` (per 32 values an
asymmetric fit by ``make_qkx2_quants``, scales and mins then quantized to 6 bits against fp16
super-block scales ``d`` / ``dmin``) and ``quantize_row_q6_K_ref`` (per 16 values a symmetric fit
by ``make_qx_quants``, int8 scales against an fp16 ``d``). Every step is vectorised over blocks and
computed in float32 as in C, with round-half-to-even as ``nearest_int``; only the order of float
sums differs from C. The byte layouts are ggml's ``block_q4_K`` / ``block_q5_K`` / ``block_q6_K``
(super-blocks of QK_K = 256 values), which gguf-py's ``gguf.quants.dequantize`` reads.

Which tensor gets which type (llama-quantize's Q4_K_M / Q5_K_M / Q6_K mixes) is in
`qdpo.export.kquant_mix`.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
_CHUNK_BLOCKS = 4096  # super-blocks quantized at a time: bounds the temporaries (~1M values)
_GROUP_MAX_EPS = np.float32(1e-15)
_F32 = np.float32


# --------------------------------------------------------------------------- entry point


def quantize_k(data: np.ndarray, qtype_name: str) -> np.ndarray:
    """``data`` (rows a multiple of 256) as Q4_K / Q5_K / Q6_K bytes, shaped like
    gguf.quants.quantize's output: (*rows, row bytes) uint8."""
    block_fn, type_size = {"Q4_K": (_q4_k_blocks, 144), "Q5_K": (_q5_k_blocks, 176),
                           "Q6_K": (_q6_k_blocks, 210)}[qtype_name]
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 0 or data.shape[-1] % QK_K != 0:
        raise ValueError(f"{qtype_name} needs rows that are a multiple of {QK_K}, "
                         f"got shape {data.shape}")
    blocks = data.reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], type_size), dtype=np.uint8)
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        stop = start + _CHUNK_BLOCKS
        out[start:stop] = block_fn(blocks[start:stop])
    return out.reshape(*data.shape[:-1], data.shape[-1] // QK_K * type_size)


def _nearest_int(x: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even."""
    return np.rint(x).astype(np.int32)


def _fp16(x: np.ndarray) -> np.ndarray:
    """(fp16 bytes, the fp16 value back in float32) of a float32 array."""
    h = x.astype(np.float16)
    return h, h.astype(np.float32)


# --------------------------------------------------------------------------- Q4_K / Q5_K


def _make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
                      nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's make_qkx2_quants (use_mad false) over rows of x: (scale, -min, L)."""
    xmin = np.minimum(x.min(axis=1), _F32(0))
    xmax = x.max(axis=1)
    sum_w = w.sum(axis=1)
    sum_x = (w * x).sum(axis=1)
    flat = xmax == xmin
    span = np.where(flat, _F32(1), xmax - xmin)
    iscale = _F32(nmax) / span
    scale = _F32(1) / iscale
    levels = np.clip(_nearest_int(iscale[:, None] * (x - xmin[:, None])), 0, nmax)
    diff = scale[:, None] * levels + xmin[:, None] - x
    best = (w * diff * diff).sum(axis=1)
    for step in range(nstep + 1):
        iscale = (_F32(rmin) + _F32(rdelta) * _F32(step) + _F32(nmax)) / span
        laux = np.clip(_nearest_int(iscale[:, None] * (x - xmin[:, None])), 0, nmax)
        lf = laux.astype(np.float32)
        sum_l = (w * lf).sum(axis=1)
        sum_l2 = (w * lf * lf).sum(axis=1)
        sum_xl = (w * lf * x).sum(axis=1)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe_det = np.where(ok, det, _F32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
        pos = this_min > 0
        this_min = np.where(pos, _F32(0), this_min)
        this_scale = np.where(pos, sum_xl / np.where(sum_l2 > 0, sum_l2, _F32(1)), this_scale)
        diff = this_scale[:, None] * lf + this_min[:, None] - x
        err = (w * diff * diff).sum(axis=1)
        better = ok & (err < best) & ~flat
        levels = np.where(better[:, None], laux, levels)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        xmin = np.where(better, this_min, xmin)
    levels = np.where(flat[:, None], 0, levels)
    scale = np.where(flat, _F32(0), scale)
    return scale.astype(np.float32), (-xmin).astype(np.float32), levels


def _q45_k_levels(blocks: np.ndarray, nmax: int, rmin: float, nstep: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shared part of quantize_row_q4_K_ref / q5_K_ref: (d fp16, dmin fp16, 6-bit scales,
    6-bit mins, levels 0..nmax) per super-block."""
    n = blocks.shape[0]
    x = blocks.reshape(n * 8, 32)
    av_x = np.sqrt((x * x).sum(axis=1) / _F32(32))
    w = av_x[:, None] + np.abs(x)
    scales, mins, levels = _make_qkx2_quants(x, w, nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale = np.maximum(scales.max(axis=1), _F32(0))
    max_min = np.maximum(mins.max(axis=1), _F32(0))
    inv_scale = np.where(max_scale > 0, _F32(63) / np.where(max_scale > 0, max_scale, 1), 0)
    inv_min = np.where(max_min > 0, _F32(63) / np.where(max_min > 0, max_min, 1), 0)
    ls = np.clip(_nearest_int(inv_scale[:, None].astype(np.float32) * scales), 0, 63)
    lm = np.clip(_nearest_int(inv_min[:, None].astype(np.float32) * mins), 0, 63)
    d16, d = _fp16(max_scale / _F32(63))
    m16, dmin = _fp16(max_min / _F32(63))
    sub_d = (d[:, None] * ls.astype(np.float32)).reshape(n * 8)
    sub_m = (dmin[:, None] * lm.astype(np.float32)).reshape(n * 8)
    has_d = sub_d != 0
    safe_d = np.where(has_d, sub_d, _F32(1))
    requant = np.clip(_nearest_int((x + sub_m[:, None]) / safe_d[:, None]), 0, nmax)
    levels = np.where(has_d[:, None], requant, levels).reshape(n, QK_K)
    return d16, m16, ls.astype(np.uint8), lm.astype(np.uint8), levels.astype(np.uint8)


def _pack_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 6-bit scales and mins -> ggml's 12 packed bytes (get_scale_min_k4's inverse)."""
    lo = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    mid = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    hi = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return np.concatenate([lo, mid, hi], axis=1).astype(np.uint8)


def _q4_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """block_q4_K: d, dmin (fp16), scales[12], qs[128] (low nibble: value l of each 64,
    high nibble: value l + 32)."""
    n = blocks.shape[0]
    d16, m16, ls, lm, levels = _q45_k_levels(blocks, 15, -1.0, 20)
    q = levels.reshape(n, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    return np.concatenate([d16.view(np.uint8).reshape(n, 2), m16.view(np.uint8).reshape(n, 2),
                           _pack_scales(ls, lm), qs], axis=1)


def _q5_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """block_q5_K: d, dmin (fp16), scales[12], qh[32] (bit 2k / 2k+1: 5th bit of the first /
    second 32 values of 64-group k), qs[128] (low 4 bits as in Q4_K)."""
    n = blocks.shape[0]
    d16, m16, ls, lm, levels = _q45_k_levels(blocks, 31, -0.5, 15)
    q = levels.reshape(n, 4, 2, 32)
    qs = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(n, 128)
    high = (q >> 4).reshape(n, 8, 32)
    shifts = np.arange(8, dtype=np.uint8)[None, :, None]
    qh = np.bitwise_or.reduce(high << shifts, axis=1).astype(np.uint8)
    return np.concatenate([d16.view(np.uint8).reshape(n, 2), m16.view(np.uint8).reshape(n, 2),
                           _pack_scales(ls, lm), qh, qs], axis=1)


# --------------------------------------------------------------------------- Q6_K


def _make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qx_quants with rmse_type 1 (weights x*x), no quant weights: (scale, L)
    where L = level + nmax in 0..2*nmax-1."""
    idx = np.abs(x).argmax(axis=1)
    xmax = np.take_along_axis(x, idx[:, None], axis=1)[:, 0]
    zero = np.abs(xmax) < _GROUP_MAX_EPS
    safe_max = np.where(zero, _F32(1), xmax)
    w = x * x

    def fit(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lv = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        lf = lv.astype(np.float32)
        return lv, (w * x * lf).sum(axis=1), (w * lf * lf).sum(axis=1)

    levels, sumlx, suml2 = fit(_F32(-nmax) / safe_max)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, _F32(1)), _F32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        lv, slx, sl2 = fit(-(_F32(nmax) + _F32(0.1) * _F32(step)) / safe_max)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        levels = np.where(better[:, None], lv, levels)
        scale = np.where(better, slx / np.where(sl2 > 0, sl2, _F32(1)), scale)
        best = np.where(better, scale * slx, best)
    levels = np.where(zero[:, None], -nmax, levels) + nmax
    return np.where(zero, _F32(0), scale).astype(np.float32), levels


def _q6_k_levels(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """quantize_row_q6_K_ref before packing: (d fp16, 16 int8 scales, levels 0..63) per
    super-block; a block whose scales all vanish is all zeros."""
    n = blocks.shape[0]
    x = blocks.reshape(n * 16, 16)
    scales, levels = _make_qx_quants(x, 32)
    scales = scales.reshape(n, 16)
    idx = np.abs(scales).argmax(axis=1)
    max_scale = np.take_along_axis(scales, idx[:, None], axis=1)[:, 0]
    zero = np.abs(max_scale) < _GROUP_MAX_EPS
    iscale = _F32(-128) / np.where(zero, _F32(1), max_scale)
    d16, d = _fp16(_F32(1) / iscale)
    sc = np.minimum(127, _nearest_int(iscale[:, None] * scales)).astype(np.int8)
    sub_d = (d[:, None] * sc.astype(np.float32)).reshape(n * 16)
    has_d = sub_d != 0
    requant = np.clip(_nearest_int(x / np.where(has_d, sub_d, _F32(1))[:, None]), -32, 31) + 32
    levels = np.where(has_d[:, None], requant, levels).reshape(n, QK_K)
    levels = np.where(zero[:, None], 0, levels).astype(np.uint8)
    sc = np.where(zero[:, None], 0, sc).astype(np.int8)
    d16 = np.where(zero, np.float16(0), d16).astype(np.float16)
    return d16, sc, levels


def _q6_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """block_q6_K: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (int8), d (fp16);
    per 128 values, ql byte l holds values l / l + 64 and byte l + 32 values l + 32 / l + 96,
    qh byte l the high bits of values l, l + 32, l + 64, l + 96."""
    n = blocks.shape[0]
    d16, sc, levels = _q6_k_levels(blocks)
    q = levels.reshape(n, 2, 4, 32)
    ql = np.concatenate([(q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4),
                         (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)], axis=2)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
    qh = np.bitwise_or.reduce((q >> 4) << shifts, axis=2)
    return np.concatenate([ql.reshape(n, 128).astype(np.uint8), qh.reshape(n, 64).astype(np.uint8),
                           sc.view(np.uint8), d16.view(np.uint8).reshape(n, 2)], axis=1)
