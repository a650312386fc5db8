"""GGUF files quantized by llama.cpp's own ``llama-quantize`` (``tests/data/gguf/``, written
once by ``fixtures/make_kquant_gguf.py``; CI does not build llama.cpp), against references
independent of this package: ``gguf.GGUFReader`` and ``gguf.quants.dequantize``, numpy's SVD,
the ``gguf`` package's ``TensorNameMap``, llama.cpp's type-choice rules (``llama_tensor_get_type``)
and the float16 source file the quantizer read (the exact W of every error W_q - W)."""
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from allennlp_analyze import analyze  # noqa: E402
from allennlp_analyze.sources.quant.gguf_blocks import decode  # noqa: E402
from gguf_files import reference  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "gguf"
SOURCE = DATA / "llama-F16.gguf"
FTYPES = ("Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_XS")
LAYERS = 1
MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def expected_type(ftype: str, name: str) -> str:
    """The type llama.cpp's ``llama_tensor_get_type`` (llama-cpp-python 0.3.2's vendored copy)
    gives tensor ``name`` of this model (1 layer, 4 query heads per KV head, every row 256
    long, no imatrix): ``output`` Q6_K; ``attn_v`` / ``ffn_down`` Q6_K for Q4_K_M / Q5_K_M in
    the layers ``use_more_bits`` picks (i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2: layer 0 of
    1); ``attn_v`` Q5_K for IQ4_XS (n_gqa >= 4); the rest the file type's base type."""
    base = {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "IQ4_XS": "IQ4_XS"}[ftype]
    if name == "output.weight":
        return "Q6_K"
    if ftype in ("Q4_K_M", "Q5_K_M") and name.endswith(("attn_v.weight", "ffn_down.weight")):
        return "Q6_K"
    if ftype == "IQ4_XS" and name.endswith("attn_v.weight"):
        return "Q5_K"
    return base


def hf_names():
    """The Hugging Face names of the model's matrices, written out by hand."""
    names = {"model.embed_tokens.weight", "lm_head.weight"}
    for i in range(LAYERS):
        names |= {f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"}
        names |= {f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    return names


def types(path):
    """name -> GGML type name of each tensor, as ``gguf.GGUFReader`` reads it."""
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


@pytest.fixture(scope="module")
def source():
    """The quantizer's input, exactly: name -> float64 matrix as stored."""
    return reference(SOURCE)


@pytest.mark.parametrize("ftype", FTYPES)
def test_type_mix_is_llama_cpps(ftype):
    """Read by gguf's own reader: every 2-D tensor of the type llama.cpp's rules give it (Q4_K_M
    holds Q4_K and Q6_K, ...), every vector F32, the file type in the metadata."""
    reader = gguf.GGUFReader(str(DATA / f"llama-{ftype}.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    matrices = {"token_embd.weight", "output.weight"} | {
        f"blk.{i}.{m}.weight" for i in range(LAYERS) for m in MATRICES}
    assert {n for n, t in types.items() if t != "F32"} == matrices
    for name in matrices:
        assert types[name] == expected_type(ftype, name), name
    field = reader.fields["general.file_type"]
    assert gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name == f"MOSTLY_{ftype}"
    assert "quantize.imatrix.file" not in reader.fields


@pytest.mark.parametrize("ftype", FTYPES)
def test_records_are_numpys_svd_under_hugging_face_names(ftype):
    """Every record: numpy's SVD of gguf's dequantization of its tensor, its dtype the tensor's
    type, its name the Hugging Face one (gguf's TensorNameMap maps it back to the stored one),
    no bound (null with the format's reason), rank_noise the auto rank."""
    path = DATA / f"llama-{ftype}.gguf"
    ref, qtypes = reference(path), types(path)
    result = analyze(str(path), min_q=1.0, include=("embeddings",), keep_spectra=True)
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, LAYERS)
    assert {r.name for r in result.records} == hf_names()
    for rec, sv in zip(result.records, result.spectra):
        assert names.get_name(rec.name, try_suffixes=(".weight",)) == rec.stored_name
        qtype, W = qtypes[rec.stored_name], ref[rec.stored_name]
        expected = np.linalg.svd(W, compute_uv=False)
        np.testing.assert_allclose(sv, expected, rtol=0, atol=1e-12 * expected[0])
        assert rec.dtype == qtype and rec.shape == W.shape
        reason = "non-uniform codebook" if qtype.startswith("IQ") else "clamps codes"
        assert rec.noise_bound is None and reason in rec.rank_note, rec.name
        assert rec.rank_criterion == "noise" and rec.rank_loss == rec.M - rec.rank_noise
    assert f"file type {ftype}" in result.summary.notes[0]


#: noise_floor / ||W_q - W||_2 on these files, by the matrix's type: measured 1.25-1.32 (Q4_K),
#: 1.18-1.25 (Q5_K), 1.20-1.29 (Q6_K), 1.60-1.72 (IQ4_XS, whose step is a uniform-grid
#: heuristic); asserted within these bands.
FLOOR_OVER_ERROR = {"Q4_K": (1.1, 1.45), "Q5_K": (1.1, 1.4), "Q6_K": (1.1, 1.4),
                    "IQ4_XS": (1.45, 1.9)}


@pytest.mark.parametrize("ftype", FTYPES)
def test_base_measured_error_beside_the_floor(ftype, source):
    """``--base`` the float16 file llama.cpp quantized: each record's measured ||W_q - W||_2
    (``delta_sv_max``, against the exact error in float64), the floor estimate within the
    stated factor of it, no bound, and the base's singular values below the error."""
    path = DATA / f"llama-{ftype}.gguf"
    ref, qtypes = reference(path), types(path)
    result = analyze(str(path), base=str(SOURCE), min_q=1.0, include=("embeddings",))
    assert len(result.records) == len(hf_names())
    for rec in result.records:
        qtype, W_q = qtypes[rec.stored_name], ref[rec.stored_name]
        W = source[rec.stored_name]
        E = W_q - W
        measured = np.linalg.norm(E, 2)
        assert rec.base_name == rec.name
        assert rec.delta_sv_max == pytest.approx(measured, rel=1e-9)
        assert rec.delta_rel == pytest.approx(np.linalg.norm(E) / np.linalg.norm(W), rel=1e-9)
        assert rec.noise_bound is None
        lo, hi = FLOOR_OVER_ERROR[qtype]
        assert lo <= rec.noise_floor / measured <= hi, (rec.name, rec.noise_floor / measured)
        sv_base = np.linalg.svd(W, compute_uv=False)
        assert rec.base_sv_below_delta == np.count_nonzero(sv_base < measured)


@pytest.mark.parametrize("ftype", FTYPES)
def test_k_quants_clamp_beyond_half_a_step(ftype, source):
    """Why a K-quant record's bound is null, on llama.cpp's own output: in every matrix some
    elements lie more than half their step d*sc from W (measured up to 1.06 steps in Q4_K,
    1.14 in Q5_K, 1.56 in the IQ4_XS file's Q5_K attn_v, 0.74 in Q6_K; 1e-4 to 3e-3 of the
    elements), and each of them is clamped at an end of its sub-block's range (its value the
    sub-block's least or greatest), the elements of interior codes being within half a step
    (to float32 rounding). The decoded
    step is the spacing of each sub-block's values (fewer than the type's levels apart)."""
    reader = gguf.GGUFReader(str(DATA / f"llama-{ftype}.gguf"))
    for t in reader.tensors:
        if not t.tensor_type.name.endswith("_K"):
            continue
        W = source[t.name]
        got = decode(t.tensor_type, np.array(t.data).view(np.uint8).reshape(W.shape[0], -1))
        assert got.worst is None and (got.step > 0).all()
        E = np.abs(got.values - W)
        beyond = E > got.step * (0.5 + 1e-5)
        assert beyond.any(), t.name
        sub, levels = {"Q4_K": (32, 16), "Q5_K": (32, 32), "Q6_K": (16, 64)}[t.tensor_type.name]
        v = got.values.reshape(-1, sub)
        k = (v - v.min(axis=1, keepdims=True)) / got.step.reshape(-1, sub)
        assert np.abs(k - np.rint(k)).max() < 1e-3, t.name  # the decoded step is the grid's
        assert np.ptp(np.rint(k), axis=1).max() <= levels - 1, t.name
        at_end = (v == v.min(axis=1, keepdims=True)) | (v == v.max(axis=1, keepdims=True))
        assert at_end.reshape(W.shape)[beyond].all(), t.name
