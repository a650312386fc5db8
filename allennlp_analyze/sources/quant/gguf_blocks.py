"""GGUF (ggml) block quantization: rows of a stored tensor decoded to float64, with every
element's quantization step and, where the format guarantees one, its worst-case error.

Values are ``gguf.quants.dequantize`` of the stored bytes (the reference decoder maintained
with llama.cpp), widened to float64. A row of M elements is M / B blocks of B elements
(``gguf.GGML_QUANT_SIZES``); the step of an element is the scale that multiplies its integer
code, read from its block's (and sub-block's) stored scales.

Per-element worst case ``|w_q - w|`` (``w`` the float32 weight handed to the quantizer,
``w_q`` the dequantized value), derived from llama.cpp's reference quantizers
(``quantize_row_*_ref``, the same code as ``gguf.quants.quantize``) and decoders:

* ``Q8_0`` (``w_q = d q``, q in [-127, 127], d = amax / 127 stored as fp16): q is the nearest
  code for the unrounded d, so ``|w - q d| <= d / 2``; the fp16 rounding of d adds
  ``|q| |d - d16| <= |q| u / 2`` (u the fp16 spacing at d16): worst
  ``(d16 + u / 2) / 2 + |q| u / 2``.
* ``Q4_0`` / ``Q5_0`` (``w_q = d q``, q in [-8, 7] / [-16, 15], d = -max / 8 / -max / 16
  where max is the element of largest magnitude): the code range is asymmetric; the extreme
  element itself maps to -8 / -16 exactly, but an element of the opposite sign and equal
  magnitude lies at +8 d / +16 d and is clamped to the top code 7 / 15: a full step. So the
  top code's worst rounding term is d, every other code's d / 2; plus the fp16 term as above.
* ``Q4_1`` / ``Q5_1`` (``w_q = d q + m``, q in [0, 15] / [0, 31], d = (max - min) / 15 / 31,
  m = min): no clamping (the range is the block's); worst ``(d16 + u_d / 2) / 2 +
  |q| u_d / 2 + u_m / 2`` (u_m the fp16 spacing at m16).
* float32 arithmetic of the quantizer (``x / d`` rounded before the code is chosen) and of the
  decoder (``d q + m`` in float32): ``2**-20 ((|q| + 1) d16 + |w_q|)`` more, far below the rest.

These bounds hold for files made by the reference quantizer. With an importance matrix
(GGUF key ``quantize.imatrix.file``) llama.cpp searches the scale (``make_qx_quants``) and may
clamp elements, so such files get no bound.

No per-element guarantee (``worst`` is None, with the reason):

* the K-quants ``Q2_K``-``Q6_K``: the quantizer searches every sub-block's scale (and min),
  rounds it to 6 or 8 bits against the block's fp16 ``d``, and clamps the codes to the range:
  an element at either end of the code range may lie arbitrarily far outside it (an outlier
  given up for the others), and a sub-block whose scale rounds to 0 holds only its min. The
  step is ``d sc`` (``Q2_K``: ``d (sc & 15)`` per 16; ``Q3_K``: ``d |sc - 32|`` per 16;
  ``Q4_K`` / ``Q5_K``: ``d sc`` per 32; ``Q6_K``: ``d |sc|`` per 16); elements with interior
  codes are within ``d sc / 2`` (plus float32 round-off) of the weight, measured in the tests.
* the lattice / codebook types (``IQ*``), ternary ``TQ1_0`` / ``TQ2_0``, ``MXFP4`` /
  ``NVFP4``, ``Q1_0``: the codebook is not a uniform grid and the encoder searches it. Their
  step is a uniform-grid equivalent, ``(block max - block min) / (2**b - 1)`` with b the type's
  whole bits per weight: a heuristic for the estimate only.

Decoding is vectorized over all blocks of the rows asked for (no Python loop per block).
"""

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from ...noise_floor import ulp
from ...quantized import DecodedRows

#: float32 slack of quantizer and decoder arithmetic (module docstring), relative.
_F32_SLACK = 2.0**-20


def _gguf():
    import gguf  # lazily: an optional extra

    return gguf


@dataclass(frozen=True)
class BlockType:
    """One GGUF tensor type: ``name`` (``"Q4_K"``), elements per block and bytes per block,
    and why its elements have no rigorous error bound (None where they do)."""

    name: str
    block_size: int
    type_size: int
    bound_reason: Optional[str]


def block_type(qtype: int) -> BlockType:
    """The :class:`BlockType` of GGML type number ``qtype`` (a ``KeyError`` for unknown ones)."""
    gguf = _gguf()
    t = gguf.GGMLQuantizationType(qtype)
    block, size = gguf.GGML_QUANT_SIZES[t]
    return BlockType(
        t.name,
        block,
        size,
        _BOUND_REASON.get(t.name, _codebook_reason(t.name)) if t.name not in _LINEAR else None,
    )


def _codebook_reason(name: str) -> str:
    return f"{name} encodes by a search over a non-uniform codebook: no per-element error bound"


_KQUANT_REASON = (
    "{} quantizer searches each sub-block's scale and min and clamps codes to "
    "the range: an element at the end of the code range has no per-element "
    "error bound"
)
_BOUND_REASON = {k: _KQUANT_REASON.format(k) for k in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")}
#: Reason for files whose legacy types were quantized with an importance matrix.
IMATRIX_REASON = (
    "quantized with an importance matrix (quantize.imatrix.*): llama.cpp's scale "
    "search may clamp elements, no per-element error bound"
)


def decode(qtype: int, raw: np.ndarray, with_worst: bool = True) -> DecodedRows:
    """Rows of a stored tensor: ``raw`` (rows x bytes, uint8, whole blocks) of GGML type
    ``qtype``, decoded (rows x elements: gguf's float32 values, which the spectrum widens to
    float64 as it copies them) with each element's step, and its worst case where
    ``with_worst`` and the type guarantees one (module docstring)."""
    gguf = _gguf()
    t = gguf.GGMLQuantizationType(qtype)
    block, size = gguf.GGML_QUANT_SIZES[t]
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    rows = raw.shape[0]
    values = gguf.quants.dequantize(raw, t).reshape(rows, -1)
    blocks = raw.reshape(-1, size)
    linear = _LINEAR.get(t.name)
    if linear is not None:
        step, worst = _linear(blocks, values.reshape(blocks.shape[0], block), linear, with_worst)
    else:
        scale = _SUB_SCALES.get(t.name)
        if scale is not None:
            sub = scale(blocks)
            step = np.repeat(sub, block // sub.shape[1], axis=1)
        else:
            step = np.broadcast_to(
                _codebook_step(values.reshape(blocks.shape[0], block), 8 * size // block),
                (blocks.shape[0], block),
            )
        worst = None
    step = step.reshape(values.shape)
    return DecodedRows(values, step, None if worst is None else worst.reshape(values.shape))


@dataclass(frozen=True)
class _Linear:
    """A legacy type ``w_q = d q (+ m)``: byte offsets of d and m (None: no m), the largest
    |code|, and the code whose rounding may reach a full step (None: none)."""

    d_at: int
    m_at: Optional[int]
    qmax: int
    clamped_code: Optional[int]


_LINEAR: Dict[str, _Linear] = {
    "Q8_0": _Linear(0, None, 127, None),
    "Q4_0": _Linear(0, None, 8, 7),
    "Q5_0": _Linear(0, None, 16, 15),
    "Q4_1": _Linear(0, 2, 15, None),
    "Q5_1": _Linear(0, 2, 31, None),
}


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 stored at byte ``at`` of every block, as float64 (n_blocks x 1)."""
    return np.ascontiguousarray(blocks[:, at : at + 2]).view(np.float16).astype(np.float64)


def _linear(
    blocks: np.ndarray, values: np.ndarray, kind: _Linear, with_worst: bool
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Step and worst case (module docstring) of the blocks of a legacy type; ``values``
    (n_blocks x block) are their dequantized elements. The worst case is ``base + |q| coef``
    with per-block ``base = (|d| + u/2) / 2 (+ u_m / 2) + 2**-20 (|d| + |m|)`` and
    ``coef = u / 2 + 2**-19 |d|`` (the float32 slack, with ``|w_q| <= |d| |q| + |m|``), plus
    ``(|d| + u/2) / 2`` more for the top code of Q4_0 / Q5_0; computed in place."""
    d = _f16(blocks, kind.d_at)
    absd = np.abs(d)
    step = np.broadcast_to(absd, values.shape)
    if not with_worst:
        return step, None
    half_d = ulp(d, "float16") / 2.0
    rounding = (absd + half_d) / 2.0
    base = rounding + _F32_SLACK * absd
    coef = half_d + 2.0 * _F32_SLACK * absd
    # codes from the values (exact: w_q = d q + m in float32 with |q| <= 127); |q| = qmax
    # where d is 0 (the stored scale underflowed: the codes say nothing)
    inverse = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0.0)
    if kind.m_at is not None:
        m = _f16(blocks, kind.m_at)
        base += ulp(m, "float16") / 2.0 + _F32_SLACK * np.abs(m)
        q = values - m
        q *= inverse
    else:
        q = values * inverse
    np.rint(q, out=q)
    top = None if kind.clamped_code is None else (q == kind.clamped_code) | (d == 0.0)
    np.abs(q, out=q)
    if (d == 0.0).any():
        np.copyto(q, float(kind.qmax), where=d == 0.0)
    q *= coef
    q += base
    if top is not None:  # the top code may hold a clamped element: a full step
        np.add(q, np.broadcast_to(rounding, q.shape), out=q, where=top)
    return step, q


def _kquant_4_5(blocks: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K: ``d sc`` of the 8 sub-blocks of 32 (n_blocks x 8)."""
    d = _f16(blocks, 0)
    scales = blocks[:, 4:16].reshape(-1, 3, 4)
    lo, hi = scales[:, 0], scales[:, 2]
    sc = np.concatenate([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], axis=1)
    return d * sc


def _kquant_q6(blocks: np.ndarray) -> np.ndarray:
    """Q6_K: ``d |sc|`` of the 16 sub-blocks of 16 (int8 scales at byte 192, d at 208)."""
    sc = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(np.float64)
    return np.abs(_f16(blocks, 208) * sc)


def _kquant_q3(blocks: np.ndarray) -> np.ndarray:
    """Q3_K: ``d |sc - 32|`` of the 16 sub-blocks of 16 (6-bit scales at byte 96, d at 108)."""
    scales = blocks[:, 96:108]
    low = (scales[:, :8, None] >> np.array([0, 4], dtype=np.uint8)).transpose(0, 2, 1)
    high = (scales[:, 8:12, None] >> np.array([0, 2, 4, 6], dtype=np.uint8)).transpose(0, 2, 1)
    sc = (low.reshape(-1, 16) & 0x0F) | ((high.reshape(-1, 16) & 0x03) << 4)
    return np.abs(_f16(blocks, 108) * (sc.astype(np.float64) - 32.0))


def _kquant_q2(blocks: np.ndarray) -> np.ndarray:
    """Q2_K: ``d (sc & 15)`` of the 16 sub-blocks of 16 (scales at byte 0, d at 80)."""
    return np.abs(_f16(blocks, 80) * (blocks[:, :16] & 0x0F).astype(np.float64))


_SUB_SCALES: Dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Q2_K": _kquant_q2,
    "Q3_K": _kquant_q3,
    "Q4_K": _kquant_4_5,
    "Q5_K": _kquant_4_5,
    "Q6_K": _kquant_q6,
}


def _codebook_step(values: np.ndarray, bits: int) -> np.ndarray:
    """Uniform-grid equivalent step of each block (module docstring), n_blocks x 1."""
    span = values.max(axis=1, keepdims=True) - values.min(axis=1, keepdims=True)
    return span / float(2 ** max(1, bits) - 1)
