"""Packed quantized layers (GPTQ, AWQ, compressed-tensors, bitsandbytes) decoded by
:mod:`allennlp_analyze.sources.quant`, checked against the libraries' own code:
compressed-tensors' quantize / pack / unpack / dequantize, bitsandbytes' quantize_4bit /
dequantize_4bit / int8_vectorwise_quant, and for GPTQ / AWQ (whose libraries need a GPU) the
packing loops and the CPU dequantization formulas of AutoGPTQ / GPTQModel / AutoAWQ written here
from their source. Our float64 values, rounded once to the library's output precision, equal the
library's values exactly; the per-element bound holds against ``W_q - W`` for the
round-to-nearest quantizers on random and MiniLM weights."""
import numpy as np
import pytest
import torch

from allennlp_analyze.errors import AnalyzeError
from allennlp_analyze.sources.quant.awq import AWQMatrix
from allennlp_analyze.sources.quant.bnb import FourBitMatrix, Int8RowMatrix
from allennlp_analyze.sources.quant.ctensors import (CTMatrix, naive_reader,
                                                      packed_reader, packed_zero_points)
from allennlp_analyze.sources.quant.gptq import GPTQMatrix
from allennlp_analyze.sources.quant.intgrid import UNIT_ROUNDOFF

ct_forward = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward")
ct_pack = pytest.importorskip(
    "compressed_tensors.compressors.quantized_compressors.pack_quantized")
bnb_functional = pytest.importorskip("bitsandbytes.functional")
from compressed_tensors.quantization import QuantizationArgs  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402


def _all_rows(matrix, block: int = 7):
    """Decode in row blocks of ``block`` (exercises block edges), stacked."""
    parts = [matrix.rows(a, min(a + block, matrix.shape[0]))
             for a in range(0, matrix.shape[0], block)]
    values = np.vstack([p.values for p in parts])
    step = np.vstack([p.step for p in parts])
    worst = None if parts[0].worst is None else np.vstack([p.worst for p in parts])
    return values, step, worst


def _rounded(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """float64 -> the library's precision, one rounding."""
    return torch.from_numpy(values).to(dtype)


@pytest.fixture(scope="module")
def minilm_weight(minilm_path) -> np.ndarray:
    """MiniLM's first FFN input matrix (1536 x 384) as stored (float32), first 96 rows."""
    from allennlp_analyze.sources.safetensors_file import SafetensorsSource
    source = SafetensorsSource(minilm_path)
    name = next(t.name for t in source.tensors() if t.name.endswith("intermediate.dense.weight"))
    return source.load(name)[:96].astype(np.float32)


# --------------------------------------------------------------------------- compressed-tensors

def _ct_quantize(w: torch.Tensor, bits: int, symmetric: bool, group_size, g_idx=None):
    """compressed-tensors' own min/max qparams and quantize: (codes int8, scale, zero point)."""
    strategy = "group" if group_size else "channel"
    args = QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy=strategy,
                            group_size=group_size)
    out, columns = w.shape
    if group_size:
        order = torch.argsort(g_idx) if g_idx is not None else torch.arange(columns)
        grouped = w[:, order].reshape(out, -1, group_size)
        lo, hi = grouped.amin(dim=2), grouped.amax(dim=2)
    else:
        lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    scale, zero = calculate_qparams(lo, hi, args)
    scale = scale.to(w.dtype)  # stored in the weight's dtype, and used so by the quantizer
    zero = zero.to(torch.int8)
    codes = ct_forward.quantize(w, scale, zero, args, dtype=torch.int8, g_idx=g_idx)
    return codes, scale, zero


@pytest.mark.parametrize("bits,symmetric,group_size,actorder", [
    (4, True, 32, False), (4, False, 32, False), (8, True, None, False), (8, False, None, False),
    (4, True, 32, True), (2, False, 16, False)])
def test_ct_pack_quantized_matches_library(bits, symmetric, group_size, actorder, minilm_weight):
    """Word-aligned packing (compressed-tensors 0.12's pack_to_int32), sym/asym, group/channel,
    act-order g_idx: values equal the library's dequantize (bf16), bound holds on MiniLM."""
    w = torch.from_numpy(minilm_weight).to(torch.bfloat16)
    g_idx = None
    if actorder:
        perm = torch.from_numpy(np.random.default_rng(0).permutation(w.shape[1]))
        g_idx = torch.empty(w.shape[1], dtype=torch.int32)
        g_idx[perm] = (torch.arange(w.shape[1]) // group_size).to(torch.int32)
    codes, scale, zero = _ct_quantize(w, bits, symmetric, group_size, g_idx)
    packed = ct_pack.pack_to_int32(codes, bits)
    reference = ct_forward.dequantize(ct_pack.unpack_from_int32(packed, bits, w.shape), scale,
                                      None if symmetric else zero, g_idx=g_idx)
    zp = None
    if not symmetric:
        zp = packed_zero_points("l.weight_zero_point",
                                ct_pack.pack_to_int32(zero, bits, packed_dim=0).numpy(),
                                w.shape[0], scale.shape[1], bits, None)
    matrix = CTMatrix("l", tuple(w.shape), packed_reader("l.weight_packed", packed.numpy(),
                                                            tuple(w.shape), bits, None),
                         scale.float().numpy(), zp, None if g_idx is None else g_idx.numpy(),
                         group_size, bits, UNIT_ROUNDOFF["bfloat16"], None)
    values, step, worst = _all_rows(matrix)
    assert torch.equal(_rounded(values, torch.bfloat16), reference)
    error = np.abs(values - w.double().numpy())
    assert np.all(error <= worst)
    # Not vacuous: the bound is within a few percent of half a step, and errors reach 40% of it.
    assert np.all(worst <= step * (0.5 + 2.0**-8 * (2**bits + 2 + 2**(bits - 1) + 1)))
    assert error.max() > 0.4 * step[error.argmax() // step.shape[1], error.argmax() % step.shape[1]]
    expected = f"ct-int{bits}-" + (f"g{group_size}" if group_size else "channel")
    assert matrix.scheme == expected


def _dense_pack(codes: torch.Tensor, bits: int) -> np.ndarray:
    """compressed-tensors >= 0.18's dense packing (helpers.pack_to_int32), restated: code ``i``
    of a row, offset to unsigned, at bit ``i * bits`` of the row's little-endian stream."""
    unsigned = (codes.numpy().astype(np.int64) + (1 << (bits - 1)))
    rows, cols = unsigned.shape
    stream = np.zeros((rows, -(-cols * bits // 32) * 32), dtype=np.uint8)
    for b in range(bits):
        stream[:, np.arange(cols) * bits + b] = (unsigned >> b) & 1
    weights = (1 << np.arange(32, dtype=np.uint64))
    return (stream.reshape(rows, -1, 32) * weights).sum(axis=2).astype(np.uint32).view(np.int32)


@pytest.mark.parametrize("bits", [3, 5, 4])
def test_ct_dense_and_legacy_packing(bits):
    """Dense (>= 0.18) and word-aligned (0.12's pack_to_int32) layouts of the same codes decode to
    the same matrix; widths tell them apart, the version where the widths agree."""
    rng = np.random.default_rng(bits)
    w = torch.from_numpy(rng.standard_normal((12, 70)).astype(np.float32)).to(torch.bfloat16)
    codes, scale, _ = _ct_quantize(w, bits, True, None)
    reference = ct_forward.dequantize(codes, scale)
    for packed, hint in ((_dense_pack(codes, bits), True),
                         (ct_pack.pack_to_int32(codes, bits).numpy(), False)):
        matrix = CTMatrix("l", (12, 70), packed_reader("l", packed, (12, 70), bits, hint),
                             scale.float().numpy(), None, None, None, bits, None, "test")
        values = _all_rows(matrix, 5)[0]
        assert torch.equal(_rounded(values, torch.bfloat16), reference)
    if bits == 3:  # 70 codes: 7 dense words, 7 word-aligned words: only the version decides
        with pytest.raises(AnalyzeError, match="cannot tell dense"):
            packed_reader("l", _dense_pack(codes, bits), (12, 70), bits, None)


def test_ct_naive_int8_matches_library():
    rng = np.random.default_rng(1)
    w = torch.from_numpy(rng.standard_normal((20, 64)).astype(np.float32)).to(torch.float16)
    codes, scale, _ = _ct_quantize(w, 8, True, 16)
    reference = ct_forward.dequantize(codes, scale)
    matrix = CTMatrix("l", (20, 64), naive_reader("l.weight", codes.numpy(), 8),
                         scale.float().numpy(), None, None, 16, 8, UNIT_ROUNDOFF["float16"], None)
    values, _, worst = _all_rows(matrix)
    assert torch.equal(_rounded(values, torch.float16), reference)
    assert np.all(np.abs(values - w.double().numpy()) <= worst)


# --------------------------------------------------------------------------- GPTQ

def _gptq_pack(intweight: np.ndarray, zeros: np.ndarray, bits: int, v1: bool):
    """AutoGPTQ's QuantLinear.pack loops (qlinear_cuda_old.py), restated: ``intweight`` (in, out)
    codes, ``zeros`` (G, out); v1 stores ``zeros - 1``."""
    intweight = intweight.astype(np.uint32)
    per = 32 // bits
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        for j in range(i, i + per):
            qweight[row] |= intweight[j] << (bits * (j - i))
        i += per
        row += 1
    stored = (zeros.astype(np.int64) - (1 if v1 else 0)).astype(np.uint32) & ((1 << bits) - 1)
    qzeros = np.zeros((stored.shape[0], stored.shape[1] // 32 * bits), dtype=np.uint32)
    i = col = 0
    while col < qzeros.shape[1]:
        for j in range(i, i + per):
            qzeros[:, col] |= stored[:, j] << (bits * (j - i))
        i += per
        col += 1
    return qweight.view(np.int32), qzeros.view(np.int32)


def _gptqmodel_dequantize(qweight, qzeros, scales, g_idx, bits, v1: bool,
                          dtype=torch.float16) -> torch.Tensor:
    """GPTQModel's TorchQuantLinear.dequantize_weight (v2 zeros; v1 converted by +1), in fp16
    (its dequant dtype) or, given float64 ``dtype``, exactly."""
    qweight, qzeros = torch.from_numpy(qweight), torch.from_numpy(qzeros)
    per = 32 // bits
    wf = torch.arange(0, 32, bits, dtype=torch.int32)
    zeros = torch.bitwise_right_shift(qzeros.unsqueeze(2).expand(-1, -1, per), wf.unsqueeze(0))
    zeros = torch.bitwise_and(zeros, (1 << bits) - 1).reshape(qzeros.shape[0], -1)
    if v1:
        zeros = zeros + 1
    weight = torch.bitwise_right_shift(qweight.unsqueeze(1).expand(-1, per, -1), wf.unsqueeze(-1))
    weight = torch.bitwise_and(weight, (1 << bits) - 1)
    weight = weight.reshape(-1, weight.shape[2])
    g = torch.from_numpy(g_idx).long()
    scales = torch.from_numpy(scales).to(dtype)
    return (scales[g] * (weight - zeros[g]).to(dtype)).T


def _gptq_fixture(bits: int, sym: bool, actorder: bool, v1: bool, out=64, columns=128, gs=32):
    """Codes, zeros and fp16 scales as a GPTQ quantizer leaves them (rounding only: the
    decoder's job is the layout), packed AutoGPTQ's way."""
    rng = np.random.default_rng(bits * 10 + sym + 2 * actorder + 4 * v1)
    groups = columns // gs
    maxq = (1 << bits) - 1
    intweight = rng.integers(0, maxq + 1, size=(columns, out))
    zeros = (np.full((groups, out), (maxq + 1) // 2) if sym
             else rng.integers(1, maxq + 1, size=(groups, out)))
    scales = (rng.random((groups, out)) * 0.02 + 1e-3).astype(np.float16)
    g_idx = np.arange(columns) // gs
    if actorder:
        g_idx = g_idx[rng.permutation(columns)]
    qweight, qzeros = _gptq_pack(intweight, zeros, bits, v1)
    return qweight, qzeros, scales, g_idx.astype(np.int32), intweight, zeros


@pytest.mark.parametrize("bits,sym,actorder,v1", [
    (4, True, False, True), (4, True, True, False), (4, False, True, True),
    (2, False, False, False),
    (8, True, False, True), (8, False, True, False)])
def test_gptq_matches_gptqmodel_dequantize(bits, sym, actorder, v1):
    qweight, qzeros, scales, g_idx, _, _ = _gptq_fixture(bits, sym, actorder, v1)
    reference = _gptqmodel_dequantize(qweight, qzeros, scales, g_idx, bits, v1)
    label = "gptq" if v1 else "gptq_v2"
    stored_g_idx = g_idx if actorder or not sym else None  # g_idx is optional when monotone
    matrix = GPTQMatrix("l", qweight, qzeros, scales, stored_g_idx, bits, 32, label, sym)
    values, step, worst = _all_rows(matrix)
    assert torch.equal(_rounded(values, torch.float16), reference)
    assert worst is None and matrix.bound_reason and "error feedback" in matrix.note
    assert np.array_equal(step, np.abs(scales.astype(np.float64))[g_idx].T)
    assert matrix.scheme == f"gptq-int{bits}-g32" + ("-actorder" if actorder else "")


def test_gptq_per_channel():
    """group_size -1: one scale and zero per output feature."""
    qweight, qzeros, scales, g_idx, _, _ = _gptq_fixture(4, False, False, True, gs=128)
    reference = _gptqmodel_dequantize(qweight, qzeros, scales, g_idx, 4, True)
    matrix = GPTQMatrix("l", qweight, qzeros, scales, None, 4, -1, "gptq", False)
    assert torch.equal(_rounded(_all_rows(matrix)[0], torch.float16), reference)
    assert matrix.scheme == "gptq-int4-channel"


def test_gptq_zero_convention_from_data_not_label():
    """Symmetric v2 zeros under a v1 label (and the reverse) decode by the data."""
    for v1, label in ((False, "gptq"), (True, "gptq_v2")):
        qweight, qzeros, scales, g_idx, _, _ = _gptq_fixture(4, True, False, v1)
        reference = _gptqmodel_dequantize(qweight, qzeros, scales, g_idx, 4, v1)
        matrix = GPTQMatrix("l", qweight, qzeros, scales, None, 4, 32, label, None)
        assert torch.equal(_rounded(_all_rows(matrix)[0], torch.float16), reference)
        assert matrix.convention.startswith("v1" if v1 else "v2")


# --------------------------------------------------------------------------- AWQ

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def _awq_gemm_pack(intweight: np.ndarray, zeros: np.ndarray):
    """AutoAWQ's WQLinear_GEMM.from_linear packing loops, restated: ``intweight`` (in, out),
    ``zeros`` (G, out)."""
    def pack(values):
        values = values.astype(np.uint32)
        packed = np.zeros((values.shape[0], values.shape[1] // 8), dtype=np.uint32)
        for col in range(values.shape[1] // 8):
            for i in range(8):
                packed[:, col] |= values[:, col * 8 + AWQ_ORDER[i]] << (i * 4)
        return packed.view(np.int32)
    return pack(intweight), pack(zeros)


def _awq_dequantize_gemm(qweight, qzeros, scales, group_size) -> torch.Tensor:
    """AutoAWQ's awq/utils/packing_utils.py dequantize_gemm (unpack_awq, reverse_awq_order),
    in fp16."""
    qweight, qzeros, scales = map(torch.from_numpy, (qweight, qzeros, scales))
    shifts = torch.arange(0, 32, 4)
    iweights = torch.bitwise_right_shift(qweight[:, :, None], shifts[None, None, :]).to(torch.int8)
    iweights = iweights.view(iweights.shape[0], -1)
    izeros = torch.bitwise_right_shift(qzeros[:, :, None], shifts[None, None, :]).to(torch.int8)
    izeros = izeros.view(izeros.shape[0], -1)
    order = torch.arange(iweights.shape[-1]).view(-1, 8)[:, AWQ_REVERSE_ORDER].view(-1)
    iweights, izeros = iweights[:, order] & 15, izeros[:, order] & 15
    scales = scales.repeat_interleave(group_size, dim=0)
    izeros = izeros.repeat_interleave(group_size, dim=0)
    return ((iweights - izeros) * scales).T


def test_awq_gemm_matches_autoawq_dequantize():
    rng = np.random.default_rng(5)
    columns, out, gs = 128, 48, 32
    intweight = rng.integers(0, 16, size=(columns, out))
    zeros = rng.integers(0, 16, size=(columns // gs, out))
    scales = (rng.random((columns // gs, out)) * 0.02 + 1e-3).astype(np.float16)
    qweight, qzeros = _awq_gemm_pack(intweight, zeros)
    reference = _awq_dequantize_gemm(qweight, qzeros, scales, gs)
    matrix = AWQMatrix("l", qweight, qzeros, scales, 4, gs, "gemm")
    values, _, worst = _all_rows(matrix, 5)  # blocks of 5 rows cut packed words of 8 columns
    assert torch.equal(_rounded(values, torch.float16), reference)
    assert worst is None and matrix.scheme == "awq-int4-g32" and "W diag(s)" in matrix.note


def test_awq_gemv_layout():
    """WQLinear_GEMV.from_linear's layout: (out, in/8) natural order; padded zeros/scales."""
    rng = np.random.default_rng(6)
    columns, out, gs = 256, 16, 64
    groups = columns // gs
    intweight = rng.integers(0, 16, size=(out, columns))
    zeros = rng.integers(0, 16, size=(out, groups))
    scales = (rng.random((out, groups)) * 0.02 + 1e-3).astype(np.float16)
    width = 2  # calculate_zeros_width(256, 64): ceil(4 / 8) = 1 -> rounded up to a multiple of 2
    qscales = np.zeros((out, width * 8), np.float16)
    qscales[:, :groups] = scales
    qweight = np.zeros((out, columns // 8), np.uint32)
    for col in range(columns // 8):
        for i in range(8):
            qweight[:, col] |= intweight[:, col * 8 + i].astype(np.uint32) << (i * 4)
    qzeros = np.zeros((out, width), np.uint32)
    for col in range(-(-groups // 8)):
        for i in range(8):
            if col * 8 + i < groups:
                qzeros[:, col] |= zeros[:, col * 8 + i].astype(np.uint32) << (i * 4)
    matrix = AWQMatrix("l", qweight.view(np.int32), qzeros.view(np.int32), qscales, 4, gs, "gemv")
    values = _all_rows(matrix)[0]
    group = np.arange(columns) // gs
    expected = ((intweight - zeros[:, group]) * scales.astype(np.float64)[:, group])
    assert np.array_equal(values, expected)


# --------------------------------------------------------------------------- bitsandbytes

def _bnb_four_bit(w: torch.Tensor, quant_type: str, nested: bool, blocksize=64):
    """bitsandbytes' own quantize_4bit and its serialized (transformers) state."""
    packed, state = bnb_functional.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                                 compress_statistics=nested)
    saved = {k: v for k, v in state.as_dict(packed=True).items()}
    meta = next(v for k, v in saved.items() if k.startswith("quant_state."))
    import json
    info = json.loads(bytes(meta.numpy().tolist()).decode())
    return packed, state, saved, info


def _four_bit_matrix(packed, saved, info) -> FourBitMatrix:
    nested = "nested_absmax" in saved
    return FourBitMatrix("l.weight", packed.numpy(), saved["absmax"].numpy(),
                         saved["quant_map"].numpy(), info,
                         saved["nested_absmax"].numpy() if nested else None,
                         saved["nested_quant_map"].numpy() if nested else None)


@pytest.mark.parametrize("quant_type,nested,columns", [
    ("nf4", False, 128), ("nf4", True, 688), ("fp4", False, 688), ("fp4", True, 128)])
def test_bnb_four_bit_matches_library(quant_type, nested, columns, minilm_weight):
    """Values equal bitsandbytes' reference 4-bit dequantization (the ``default`` backend's
    ``_dequantize_4bit_compute``: code[k] * absmax[k // blocksize] over the flattened matrix in
    float32, cast to the state's dtype; the same definition as its quantizer). Row length 688 is
    not a multiple of the block size: there bitsandbytes' own CPU kernel
    (``bitsandbytes.functional.dequantize_4bit`` on CPU, 0.50.2) decodes the blocks that cross a
    row end wrongly (errors of the size of the weights); the test records that it differs."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code
    rng = np.random.default_rng(columns)
    w = torch.from_numpy(rng.standard_normal((24, columns)).astype(np.float32) * 0.05)
    if columns == 128:
        w = torch.from_numpy(minilm_weight[:24, :128].copy())
    w = w.to(torch.bfloat16)
    packed, state, saved, info = _bnb_four_bit(w, quant_type, nested)
    absmax = state.absmax
    if nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    reference = _dequantize_4bit_compute.__wrapped__(  # not torch.compile'd: slow to start
        packed.reshape(-1), absmax,
                                         _get_4bit_code(quant_type, packed.device), 64,
                                         list(w.shape), torch.bfloat16)
    matrix = _four_bit_matrix(packed, saved, info)
    values, step, worst = _all_rows(matrix, 5)
    assert torch.equal(torch.from_numpy(values).float().to(torch.bfloat16), reference)
    cpu = bnb_functional.dequantize_4bit(packed, state)
    assert torch.equal(cpu, reference) == (columns % 64 == 0)
    error = np.abs(values - w.double().numpy())
    assert np.all(error <= worst)
    # Not vacuous: errors reach 30% of the largest bound; bounds are about half the cell.
    assert error.max() > 0.3 * worst.max() and np.median(worst / step) < 0.75
    assert matrix.scheme == f"{quant_type}-b64"


def test_bnb_int8_matches_library(minilm_weight):
    w = torch.from_numpy(minilm_weight[:40]).to(torch.float16)
    codes, scb, _ = torch.ops.bitsandbytes.int8_vectorwise_quant.default(w.clone())
    reference = bnb_functional.int8_vectorwise_dequant(codes, scb)
    matrix = Int8RowMatrix("l.weight", codes.numpy(), scb.numpy())
    values, step, worst = _all_rows(matrix)
    assert np.allclose(values, reference.double().numpy(), rtol=3 * 2.0**-24, atol=0)
    error = np.abs(values - w.double().numpy())
    assert np.all(error <= worst) and error.max() > 0.4 * step.max()
    assert np.all(worst <= step * (0.5 + 2.0**-15))


# --------------------------------------------------------------------------- checkpoint folders

def _folder(tmp_path, tensors: dict, config=None, recipe=None):
    """A safetensors model folder; ``tensors`` numpy or torch arrays."""
    import json

    from safetensors.torch import save_file
    tmp_path.mkdir(parents=True, exist_ok=True)
    save_file({k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v)))
               for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    if recipe is not None:
        (tmp_path / "recipe.yaml").write_text(recipe)
    return tmp_path


def _open(folder):
    from allennlp_analyze.sources.quant.packed import open_packed
    from allennlp_analyze.sources.safetensors_file import SafetensorsSource
    return open_packed(SafetensorsSource(folder / "model.safetensors"), folder)


GPTQ_CONFIG = {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32,
                                       "sym": True, "desc_act": True,
                                       "checkpoint_format": "gptq"}}


def _gptq_tensors(prefix="model.layers.0.self_attn.q_proj", bits=4, sym=True, actorder=True):
    qweight, qzeros, scales, g_idx, _, _ = _gptq_fixture(bits, sym, actorder, True)
    return {f"{prefix}.qweight": qweight, f"{prefix}.qzeros": qzeros, f"{prefix}.scales": scales,
            f"{prefix}.g_idx": g_idx, f"{prefix}.bias": np.zeros(64, np.float16)}, \
        _gptqmodel_dequantize(qweight, qzeros, scales, g_idx, bits, True)


def test_gptq_folder_lists_layers_once_under_their_names(tmp_path):
    tensors, reference = _gptq_tensors()
    tensors["model.embed_tokens.weight"] = np.ones((10, 128), np.float32)
    source = _open(_folder(tmp_path, tensors, GPTQ_CONFIG))
    listing = {t.name: t for t in source.tensors()}
    layer = "model.layers.0.self_attn.q_proj.weight"
    assert set(listing) == {layer, "model.layers.0.self_attn.q_proj.bias",
                            "model.embed_tokens.weight"} | source.metadata
    assert listing[layer].shape == (64, 128) and listing[layer].dtype == "gptq-int4-g32-actorder"
    assert all(listing[m].module_type == "QuantizationMetadata" for m in source.metadata)
    assert source.metadata == {f"model.layers.0.self_attn.q_proj.{s}"
                               for s in ("qzeros", "scales", "g_idx")}
    assert source.metadata_bytes == (tensors[layer[:-6] + "qzeros"].nbytes
                                     + tensors[layer[:-6] + "scales"].nbytes
                                     + tensors[layer[:-6] + "g_idx"].nbytes)
    assert source.load(layer) is source.quantized(layer)
    assert torch.equal(_rounded(source.quantized(layer).rows(0, 64).values, torch.float16),
                       reference)
    assert source.quantized(layer).bound_reason is not None
    assert source.note == ("quantization gptq: 1 packed layers (1 gptq-int4-g32-actorder); "
                           "3 side tensors (1.1 KiB) of quantization metadata")


def test_a_shard_alone_is_its_part_of_the_whole(tmp_path):
    """A two-shard GPTQ checkpoint whose layer 0 keeps its codes in shard 1 and its scales,
    zeros and g_idx in shard 2: each shard read alone gives the layers whose codes it holds
    (their side tensors read from the other shard), the same records as the folder gives them,
    and counts its side tensors of the other shard's layer as metadata (never matrices)."""
    import json

    from safetensors.torch import save_file

    from allennlp_analyze import analyze
    from allennlp_analyze.sources import open_source

    t0, ref0 = _gptq_tensors("model.layers.0.self_attn.q_proj")
    t1, _ = _gptq_tensors("model.layers.1.self_attn.q_proj")
    first = {k: v for k, v in t0.items() if k.endswith((".qweight", ".bias"))}
    second = {**{k: v for k, v in t0.items() if k not in first}, **t1}
    shards = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": second}
    for name, tensors in shards.items():
        save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()},
                  str(tmp_path / name))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, t in shards.items() for k in t}}))
    (tmp_path / "config.json").write_text(json.dumps(GPTQ_CONFIG))
    whole = {r.name: r for r in analyze(str(tmp_path), min_q=1.0).records}
    layer0, layer1 = (f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1))
    assert set(whole) == {layer0, layer1}
    # a broken index that sorts before the checkpoint's own is passed over
    (tmp_path / "adapter.safetensors.index.json").write_text("{not json")
    part = open_source(tmp_path / "model-00001-of-00002.safetensors")
    assert torch.equal(_rounded(part.quantized(layer0).rows(0, 64).values, torch.float16), ref0)
    for name, want in (("model-00001-of-00002.safetensors", [layer0]),
                       ("model-00002-of-00002.safetensors", [layer1])):
        result = analyze(str(tmp_path / name), min_q=1.0)
        assert [r.name for r in result.records] == want
        for r in result.records:
            assert (r.sv_max, r.sv_min, r.alpha, r.noise_bound) == (
                whole[r.name].sv_max, whole[r.name].sv_min, whole[r.name].alpha,
                whole[r.name].noise_bound)
        metadata = result.summary.skipped.get("quantization metadata (scales, zero points, "
                                              "g_idx, absmax...)", 0)
        assert metadata == (0 if want == [layer0] else 6), result.summary.skipped
    # a shard holding a tensor that the index places elsewhere is not read as its part
    extra = {**first, "model.layers.1.self_attn.q_proj.bias": np.ones(64, np.float16)}
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in extra.items()},
              str(tmp_path / "model-00001-of-00002.safetensors"))
    with pytest.raises(AnalyzeError, match=r"model-00001-of-00002\.safetensors holds "
                                           r"model\.layers\.1\.self_attn\.q_proj\.bias, which "
                                           r".*model\.safetensors\.index\.json places elsewhere"):
        analyze(str(tmp_path / "model-00001-of-00002.safetensors"))

def test_awq_and_gptq_told_apart_without_config(tmp_path):
    tensors, reference = _gptq_tensors(actorder=False)
    rng = np.random.default_rng(8)
    intweight, zeros = rng.integers(0, 16, (128, 48)), rng.integers(0, 16, (4, 48))
    scales = (rng.random((4, 48)) * 0.01 + 1e-3).astype(np.float16)
    qweight, qzeros = _awq_gemm_pack(intweight, zeros)
    tensors.update({"awq.qweight": qweight, "awq.qzeros": qzeros, "awq.scales": scales})
    source = _open(_folder(tmp_path, tensors))
    dtypes = {t.name: t.dtype for t in source.tensors()}
    assert dtypes["awq.weight"] == "awq-int4-g32"
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == "gptq-int4-g32"
    assert torch.equal(_rounded(source.quantized("awq.weight").rows(0, 48).values,
                                torch.float16), _awq_dequantize_gemm(qweight, qzeros, scales, 32))
    assert torch.equal(_rounded(source.quantized("model.layers.0.self_attn.q_proj.weight")
                                .rows(0, 64).values, torch.float16), reference)


def _ct_folder(tmp_path, w: torch.Tensor, recipe, bits=4, symmetric=False, version="0.12.2"):
    codes, scale, zero = _ct_quantize(w, bits, symmetric, 32)
    tensors = {"l.weight_packed": ct_pack.pack_to_int32(codes, bits),
               "l.weight_scale": scale, "l.weight_shape": torch.tensor(w.shape)}
    if not symmetric:
        tensors["l.weight_zero_point"] = ct_pack.pack_to_int32(zero, bits,
                                                              packed_dim=0).contiguous()
    config = {"quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "version": version,
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group",
            "group_size": 32, "observer": "minmax"}}}}}
    reference = ct_forward.dequantize(codes, scale, None if symmetric else zero)
    return _folder(tmp_path, tensors, config, recipe), reference


def test_ct_folder_bound_from_the_recipe(tmp_path, minilm_weight):
    w = torch.from_numpy(minilm_weight[:40]).to(torch.bfloat16)
    rtn = "quant_stage:\n  quant_modifiers:\n    QuantizationModifier:\n      targets: [Linear]\n"
    folder, reference = _ct_folder(tmp_path / "rtn", w, rtn)
    source = _open(folder)
    assert [t.dtype for t in source.tensors() if t.name == "l.weight"] == ["ct-int4-g32"]
    matrix = source.quantized("l.weight")
    rows = matrix.rows(0, 40)
    assert torch.equal(_rounded(rows.values, torch.bfloat16), reference)
    assert matrix.bound_reason is None and np.all(np.abs(rows.values - w.double().numpy())
                                                  <= rows.worst)
    gptq = rtn.replace("QuantizationModifier", "GPTQModifier")
    for sub, text in (("gptq", gptq), ("none", None)):
        matrix = _open(_ct_folder(tmp_path / sub, w, text)[0]).quantized("l.weight")
        assert matrix.rows(0, 3).worst is None and matrix.bound_reason


def test_bnb_folder_nf4_double_quant_and_int8(tmp_path, minilm_weight):
    w = torch.from_numpy(minilm_weight[:32, :128].copy()).to(torch.bfloat16)
    packed, state, saved, info = _bnb_four_bit(w, "nf4", True)
    tensors = {"q.weight": packed}
    tensors.update({f"q.weight.{k}": v for k, v in saved.items()})
    codes, scb, _ = torch.ops.bitsandbytes.int8_vectorwise_quant.default(w.half().clone())
    tensors.update({"k.weight": codes, "k.SCB": scb})
    config = {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}
    source = _open(_folder(tmp_path, tensors, config))
    assert {t.name: (t.dtype, t.shape) for t in source.tensors()
            if t.name not in source.metadata} == {
        "q.weight": ("nf4-b64", (32, 128)), "k.weight": ("int8-rowwise", (32, 128))}
    assert "k.SCB" in source.metadata and "q.weight.nested_absmax" in source.metadata
    for name in ("q.weight", "k.weight"):
        rows = source.quantized(name).rows(0, 32)
        assert np.all(np.abs(rows.values - w.double().numpy()) <= rows.worst)


@pytest.mark.parametrize("case", ["bits-lie", "scales-shape", "g_idx-range", "ct-width",
                                  "marlin", "exl2", "gptq-3bit", "bnb-state", "method",
                                  "ct-format", "group-type"])
def test_hostile_packed_layers(tmp_path, case):
    """Each is one AnalyzeError line naming the problem."""
    tensors, _ = _gptq_tensors()
    config = GPTQ_CONFIG
    p = "model.layers.0.self_attn.q_proj"
    expected = {"bits-lie": "config says 8 bits", "scales-shape": "scales has shape",
                "g_idx-range": "names groups", "ct-width": "words per row",
                "marlin": "Marlin layout", "exl2": "EXL2", "gptq-3bit": "3-bit",
                "bnb-state": "quant state", "method": "method hqq is not supported",
                "ct-format": "format sparse-24-bitmask is not supported",
                "group-type": "group_size 32 is not an integer"}[case]
    if case == "bits-lie":
        config = {"quantization_config": dict(GPTQ_CONFIG["quantization_config"], bits=8)}
    elif case == "scales-shape":
        tensors[f"{p}.scales"] = tensors[f"{p}.scales"][:, :32]
    elif case == "g_idx-range":
        tensors[f"{p}.g_idx"] = tensors[f"{p}.g_idx"] + 3
    elif case == "ct-width":
        folder, _ = _ct_folder(tmp_path / "ct", torch.ones(8, 64, dtype=torch.bfloat16), None)
        from safetensors.torch import load_file, save_file
        data = load_file(str(folder / "model.safetensors"))
        data["l.weight_packed"] = data["l.weight_packed"][:, :5].contiguous()
        save_file(data, str(folder / "model.safetensors"))
        tmp_path, tensors, config = folder, None, None
    elif case == "marlin":
        config = {"quantization_config": dict(GPTQ_CONFIG["quantization_config"],
                                              checkpoint_format="marlin")}
    elif case == "exl2":
        tensors = {"m.q_weight": np.zeros((4, 4), np.int32),
                   "m.q_scale_max": np.ones(4, np.float16)}
    elif case == "gptq-3bit":
        tensors[f"{p}.qzeros"] = np.zeros((4, 6), np.int32)
        config = None
    elif case == "group-type":
        config = {"quantization_config": dict(GPTQ_CONFIG["quantization_config"],
                                              group_size="32")}
    elif case == "ct-format":
        config = {"quantization_config": {"quant_method": "compressed-tensors",
                                          "format": "sparse-24-bitmask"}}
    elif case == "method":
        config = {"quantization_config": {"quant_method": "hqq", "nbits": 4}}
    elif case == "bnb-state":
        tensors = {"q.weight": np.zeros((8, 1), np.uint8),
                   "q.weight.absmax": np.ones(1, np.float32),
                   "q.weight.quant_map": np.linspace(-1, 1, 16).astype(np.float32),
                   "q.weight.quant_state.bitsandbytes__nf4":
                       np.frombuffer(b"{nope", np.uint8).copy()}
    folder = tmp_path if tensors is None else _folder(tmp_path, tensors, config)
    with pytest.raises(AnalyzeError, match=expected) as info:
        _open(folder)
    assert "\n" not in str(info.value)


def test_ct_float_quantized_fp8_folder(tmp_path, minilm_weight):
    """float-quantized: float8 E4M3 weights times per-channel scales, from compressed-tensors'
    own qparams and quantize; values equal its dequantize (bf16), the bound holds."""
    w = torch.from_numpy(minilm_weight[:48]).to(torch.bfloat16)
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
    scale, _ = calculate_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), args)
    scale = scale.to(torch.bfloat16)
    codes = ct_forward.quantize(w, scale, None, args, dtype=torch.float8_e4m3fn)
    reference = ct_forward.dequantize(codes, scale)
    config = {"quantization_config": {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}}}}}
    recipe = "quant_stage:\n  quant_modifiers:\n    QuantizationModifier: {}\n"
    source = _open(_folder(tmp_path, {"l.weight": codes, "l.weight_scale": scale}, config, recipe))
    assert [t.dtype for t in source.tensors() if t.name == "l.weight"] == ["ct-fp8-channel"]
    rows = source.quantized("l.weight").rows(0, 48)
    assert torch.equal(_rounded(rows.values, torch.bfloat16), reference)
    error = np.abs(rows.values - w.double().numpy())
    assert np.all(error <= rows.worst) and error.max() > 0.3 * rows.worst.max()


# --------------------------------------------------------------------------- Llama-shaped

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _gptq_rtn(w: np.ndarray, group_size: int = 128, bits: int = 4):
    """AutoGPTQ's symmetric Quantizer (scale = 2 absmax / maxq, zero = (maxq + 1) / 2, codes
    clamp(round(w / scale) + zero)) per group, without the error feedback: (intweight (in, out),
    zeros (G, out), fp16 scales (G, out))."""
    out, columns = w.shape
    maxq = (1 << bits) - 1
    groups = w.reshape(out, columns // group_size, group_size)
    absmax = np.maximum(np.abs(groups).max(axis=2), 1e-8)
    scales = (2 * absmax / maxq).astype(np.float16)
    zero = (maxq + 1) // 2
    codes = np.clip(np.round(groups / scales[:, :, None].astype(np.float32)) + zero, 0, maxq)
    return codes.reshape(out, columns).T.astype(np.int64), np.full(scales.T.shape, zero), \
        scales.T.copy()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A Llama-shaped model (transformers.LlamaConfig, random init, 2 layers) and three packed
    checkpoints of it: GPTQ int4 g128 (AutoGPTQ's quantizer without error feedback, packed
    AutoGPTQ's way), compressed-tensors int4 g128 (its own quantize and pack) and NF4 with double
    quantization (bitsandbytes' quantize_4bit): ``(float weights, {scheme: (folder, references)})``
    with the libraries' dequantizations as references: ``(folder, in the library's precision,
    in float64)`` (the libraries' own dequantize functions given float64 scales)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=300)
    state = {k: v.to(torch.bfloat16) for k, v in LlamaForCausalLM(config).state_dict().items()}
    root = tmp_path_factory.mktemp("llama")
    base = config.to_dict()
    linear = [f"model.layers.{i}.{m}" for i in range(2) for m in LINEARS]
    plain = {k: v for k, v in state.items() if not any(k == f"{p}.weight" for p in linear)}
    out, exact = {}, {}
    # GPTQ
    tensors, refs = dict(plain), {}
    for p in linear:
        w = state[f"{p}.weight"].float().numpy()
        intweight, zeros, scales = _gptq_rtn(w)
        qweight, qzeros = _gptq_pack(intweight, zeros, 4, True)
        g_idx = (np.arange(w.shape[1]) // 128).astype(np.int32)
        tensors.update({f"{p}.qweight": qweight, f"{p}.qzeros": qzeros, f"{p}.scales": scales,
                        f"{p}.g_idx": g_idx})
        refs[f"{p}.weight"] = _gptqmodel_dequantize(qweight, qzeros, scales, g_idx, 4, True)
        exact[("gptq", p)] = _gptqmodel_dequantize(qweight, qzeros, scales, g_idx, 4, True,
                                                   torch.float64).numpy()
    gptq = dict(base, quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128,
                                           "sym": True, "desc_act": False,
                                           "checkpoint_format": "gptq"})
    out["gptq"] = (_folder(root / "gptq", tensors, gptq), refs)
    # compressed-tensors
    tensors, refs = dict(plain), {}
    for p in linear:
        w = state[f"{p}.weight"]
        codes, scale, _ = _ct_quantize(w, 4, True, 128)
        tensors.update({f"{p}.weight_packed": ct_pack.pack_to_int32(codes, 4),
                        f"{p}.weight_scale": scale, f"{p}.weight_shape": torch.tensor(w.shape)})
        refs[f"{p}.weight"] = ct_forward.dequantize(codes, scale)
        exact[("ct", p)] = ct_forward.dequantize(codes, scale.double()).numpy()
    ct = dict(base, quantization_config={
        "quant_method": "compressed-tensors", "format": "pack-quantized", "version": "0.12.2",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
            "group_size": 128}}}, "ignore": ["lm_head"]})
    recipe = "quant_stage:\n  quant_modifiers:\n    QuantizationModifier:\n      scheme: W4A16\n"
    out["ct"] = (_folder(root / "ct", tensors, ct, recipe), refs)
    # NF4
    tensors, refs = dict(plain), {}
    for p in linear:
        w = state[f"{p}.weight"]
        packed, st, saved, _ = _bnb_four_bit(w, "nf4", True)
        tensors[f"{p}.weight"] = packed
        tensors.update({f"{p}.weight.{k}": v for k, v in saved.items()})
        refs[f"{p}.weight"] = bnb_functional.dequantize_4bit(packed, st)  # rows of 256/512
        absmax = bnb_functional.dequantize_blockwise(st.absmax, st.state2) + st.offset
        exact[("nf4", p)] = _dequantize_4bit_compute.__wrapped__(
            packed.reshape(-1), absmax.double(), _get_4bit_code("nf4", packed.device).double(),
            64, list(w.shape), torch.float64).numpy()
    nf4 = dict(base, quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True,
                                          "bnb_4bit_quant_type": "nf4",
                                          "bnb_4bit_use_double_quant": True})
    out["nf4"] = (_folder(root / "nf4", tensors, nf4), refs)
    for scheme, (folder, refs) in out.items():
        out[scheme] = (folder, refs, {f"{p}.weight": exact[(scheme, p)] for p in linear})
    return {k: v.float().numpy() for k, v in state.items()}, out


@pytest.mark.parametrize("scheme,dtype", [("gptq", "gptq-int4-g128"), ("ct", "ct-int4-g128"),
                                          ("nf4", "nf4-b64")])
def test_llama_checkpoints_read_as_their_layers(llama, scheme, dtype):
    """Every linear layer of both blocks once, under the unquantized model's name and shape,
    equal to the library's dequantization; bounds hold for the round-to-nearest schemes."""
    weights, out = llama
    folder, refs, _ = out[scheme]
    source = _open(folder)
    listing = {t.name: t for t in source.tensors() if t.name not in source.metadata}
    assert set(listing) == set(weights)
    for name, ref in refs.items():
        assert listing[name].dtype == dtype and listing[name].shape == weights[name].shape
        rows = source.quantized(name).rows(0, ref.shape[0])
        values = torch.from_numpy(rows.values)
        if scheme == "nf4":  # bitsandbytes: float32 products, then cast
            values = values.float()
        assert torch.equal(values.to(ref.dtype), ref), name
        if scheme != "gptq":
            assert np.all(np.abs(rows.values - weights[name]) <= rows.worst), name


def test_describe_shows_each_packed_layer_once(llama, tmp_path, capsys):
    """``--describe`` (JSON): each linear layer once, as the matrix it encodes, with its scheme;
    the side tensors are quantization metadata, never planned."""
    import json

    from allennlp_analyze import cli
    weights, out = llama
    path = tmp_path / "describe.json"
    assert cli.main([str(out["gptq"][0]), "--describe", "--min-q", "1", "--format", "json",
                     "-o", str(path)]) == 0
    doc = json.loads(path.read_text())
    rows = doc["tensors"]
    by_name = {}
    for row in rows:
        by_name.setdefault(row["name"], []).append(row)
    layer = "model.layers.1.mlp.down_proj.weight"
    assert len(by_name[layer]) == 1 and by_name[layer][0]["dtype"] == "gptq-int4-g128"
    assert by_name[layer][0]["shape"] == [256, 512] and by_name[layer][0]["kind"] == "linear"
    assert doc["summary"]["matrices"] == 15  # 14 packed layers and the float lm_head
    side = [r for r in rows if r["name"].endswith((".qzeros", ".scales", ".g_idx"))]
    assert len(side) == 3 * 14 and all(r["kind"] == "quant_metadata" for r in side)
    assert not any(r["name"].endswith(".qweight") for r in rows)


@pytest.mark.parametrize("scheme", ["gptq", "ct", "nf4"])
def test_llama_records_are_numpys_svd_and_within_the_bound(llama, scheme):
    """One command per checkpoint: every linear layer has a record under its own name, with
    alpha and a quantization noise floor; its singular values are numpy's SVD of the library's
    dequantization (float64); for the round-to-nearest schemes the noise bound is >= the
    measured ||W_q - W||_2 against the unquantized weights; GPTQ has none, and says why."""
    from allennlp_analyze import analyze
    weights, out = llama
    folder, _, exact = out[scheme]
    result = analyze(str(folder), min_q=1.0, keep_spectra=True)
    records = dict(zip((r.name for r in result.records), zip(result.records, result.spectra)))
    assert set(exact) <= set(records)
    ratios = []
    for name, R in exact.items():
        rec, sv = records[name]
        expected = np.linalg.svd(R, compute_uv=False)
        np.testing.assert_allclose(sv, expected, rtol=0, atol=1e-12 * expected[0])
        assert rec.shape == R.shape and rec.kind == "linear" and rec.alpha is not None
        assert rec.noise_floor > 0 and rec.rank_numpy is None
        assert rec.rank_noise == int(np.count_nonzero(expected > rec.noise_floor))
        error = np.linalg.norm(R - weights[name], 2)
        ratios.append(rec.noise_floor / error)
        if scheme == "gptq":
            assert rec.noise_bound is None and "error feedback" in rec.rank_note
        else:
            assert rec.noise_bound >= error, name
    # The estimate (variance step^2 / 12 per element) against the measured error.
    assert 0.8 <= min(ratios) and max(ratios) <= 1.6, (min(ratios), max(ratios))


@pytest.mark.parametrize("scheme", ["ct", "nf4"])
def test_llama_base_measured_error_within_the_bound(llama, tmp_path, scheme):
    """``--base`` with the unquantized model: each packed layer's measured ||W_q - W_base||_2
    (delta_sv_max) equals numpy's on the libraries' dequantization, and lies within the
    record's rigorous noise bound (round-to-nearest schemes)."""
    pytest.importorskip("allennlp_analyze.compare")
    from allennlp_analyze import analyze
    weights, out = llama
    folder, _, exact = out[scheme]
    base = _folder(tmp_path / "base", {k: torch.from_numpy(v).to(torch.bfloat16)
                                       for k, v in weights.items()})
    result = analyze(str(folder), base=str(base / "model.safetensors"), min_q=1.0)
    records = {r.name: r for r in result.records}
    for name, R in exact.items():
        rec = records[name]
        measured = np.linalg.norm(R - weights[name], 2)
        assert rec.base_name == name
        assert rec.delta_sv_max == pytest.approx(measured, rel=1e-6)
        assert rec.noise_bound >= rec.delta_sv_max
