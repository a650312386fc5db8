"""Simple K-quantizers for tests and benchmarks (the ``gguf`` package has none, and CI does not
compile llama.cpp): bytes in the exact Q4_K / Q6_K block layouts that ``gguf.quants.dequantize``
decodes, from float32 rows, with each sub-block's scale chosen by its range (no search) and every
code the nearest in range for the stored (fp16 / 6-bit / 8-bit) scales, as llama.cpp's reference
quantizers do in their last step. Returned with the effective step ``d sc`` of each element, which
the package's decoder must find on its own."""
from typing import Tuple

import numpy as np

QK_K = 256


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def quantize_q4_k(W: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Rows of ``W`` (float32, row length a multiple of 256) as Q4_K bytes (rows x bytes) and
    the step of every element."""
    rows = W.shape[0]
    x = W.astype(np.float32).reshape(-1, 8, 32)
    lo = np.minimum(x.min(axis=2), 0.0)
    scale = (x.max(axis=2) - lo) / 15.0
    mins = -lo
    d = _f16(scale.max(axis=1) / 63.0)
    dmin = _f16(mins.max(axis=1) / 63.0)
    df, mf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.clip(np.rint(np.where(df > 0, scale / df, 0)), 0, 63).astype(np.uint8)
        m = np.clip(np.rint(np.where(mf > 0, mins / mf, 0)), 0, 63).astype(np.uint8)
    step = df * sc
    offset = mf * m
    with np.errstate(divide="ignore", invalid="ignore"):
        L = np.where(step[..., None] > 0, np.rint((x + offset[..., None]) / step[..., None]), 0)
    L = np.clip(L, 0, 15).astype(np.uint8)
    scales = np.zeros((len(x), 12), np.uint8)
    scales[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    pairs = L.reshape(-1, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    raw = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8),
                          scales, qs], axis=1)
    steps = np.repeat(step.astype(np.float64), 32, axis=1)
    return raw.reshape(rows, -1), steps.reshape(W.shape)


def quantize_q6_k(W: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Rows of ``W`` as Q6_K bytes (int8 scale per 16 elements, codes in [-32, 31]) and the
    step of every element."""
    rows = W.shape[0]
    x = W.astype(np.float32).reshape(-1, 16, 16)
    scale = np.abs(x).max(axis=2) / 32.0
    d = _f16(scale.max(axis=1) / 127.0)
    df = d.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.clip(np.rint(np.where(df > 0, scale / df, 0)), 0, 127).astype(np.int8)
    step = df * sc
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step[..., None] > 0, np.rint(x / step[..., None]), 0)
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)  # e = h 128 + k 32 + b
    low, high = q & 15, q >> 4
    # ql[h 64 + n 64/2...]: element h 128 + n 64 + b holds ql[h, b] nibble n (b < 64)
    low64 = low.reshape(-1, 2, 2, 64)
    ql = (low64[:, :, 0] | (low64[:, :, 1] << 4)).reshape(-1, 128)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4)
          | (high[:, :, 3] << 6)).reshape(-1, 64)
    raw = np.concatenate([ql, qh, sc.view(np.uint8), d.reshape(-1, 1).view(np.uint8)], axis=1)
    steps = np.repeat(step.astype(np.float64), 16, axis=1)
    return raw.reshape(rows, -1), steps.reshape(W.shape)
