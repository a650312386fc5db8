"""ONNX QDQ convolution kernels and sparse initializers against the onnx package's own reading:
the reference evaluator's ``DequantizeLinear``, onnx's checker, torch's densification of the
same COO tensor, and numpy's SVD of each matrix."""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
import torch  # noqa: E402
from conftest import assert_record_matches_reference  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402
from test_onnx import OPTS, _float, _model, _quantize, records  # noqa: E402

from allennlp_analyze.errors import AnalyzeError  # noqa: E402
from allennlp_analyze.options import AnalysisOptions  # noqa: E402
from allennlp_analyze.quantized import QuantizedKernel  # noqa: E402
from allennlp_analyze.source_run import plan_source  # noqa: E402
from allennlp_analyze.sources.onnx_file import OnnxSource  # noqa: E402

OUT, IN, KH, KW = 8, 6, 3, 2
#: Code ranges of the ONNX integer types.
RANGES = {TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255),
          TensorProto.INT4: (-8, 7), TensorProto.UINT4: (0, 15)}


def _qdq_conv(W, codes, code_type, scale, zero_point, axis, block_size=0, op="Conv"):
    """x -> op(x, DequantizeLinear(codes, scale, zero_point)): a QDQ kernel as the weight of a
    ``Conv`` (or ``ConvTranspose``) node; codes, scale and zero point stored as initializers."""
    inits = [helper.make_tensor("conv.weight_quantized", code_type, codes.shape,
                                codes.astype(np.int64).ravel().tolist()),
             numpy_helper.from_array(np.asarray(scale, np.float32), "conv.weight_scale")]
    inputs = ["conv.weight_quantized", "conv.weight_scale"]
    if zero_point is not None:
        inits.append(helper.make_tensor("conv.weight_zero_point", code_type,
                                        np.shape(zero_point),
                                        np.asarray(zero_point, np.int64).ravel().tolist()))
        inputs.append("conv.weight_zero_point")
    attrs = dict(axis=axis, **({"block_size": block_size} if block_size else {}))
    channels = W.shape[0] if op == "ConvTranspose" else W.shape[1]
    nodes = [helper.make_node("DequantizeLinear", inputs, ["w"], **attrs),
             helper.make_node(op, ["x", "w"], ["y"], name=f"/conv/{op}")]
    model = _model(nodes, [_float("x", [1, channels, 5, 5])], [_float("y", ["n", "c", "h", "w"])], inits,
                   opset=21)
    return model


def _scheme(name, W):
    """``(codes, ONNX type, scale, zero point, axis, block size, scale broadcast to W,
    zero point broadcast to W)`` of W quantized as ``name`` says (QuantizeLinear by hand)."""
    o = W.shape[0]
    if name == "int8-per-channel":  # axis 0, the output channels: onnxruntime's default
        scale = (np.abs(W).reshape(o, -1).max(axis=1) / 127).astype(np.float32)
        full, zp, zfull, axis, block, t = scale[:, None, None, None], None, 0, 0, 0, TensorProto.INT8
    elif name == "uint8-per-tensor":
        scale = np.array((W.max() - W.min()) / 255, dtype=np.float32)
        zp = np.array(np.round(-W.min() / scale), dtype=np.uint8)
        full, zfull, axis, block, t = scale, zp.astype(np.float64), 0, 0, TensorProto.UINT8
    elif name == "int4-blocked":  # blocks of 4 input channels: 6 -> 2 blocks, the last short
        blocks = [np.abs(W[:, :4]).max(axis=1), np.abs(W[:, 4:]).max(axis=1)]
        scale = (np.stack(blocks, axis=1) / 7).astype(np.float32)  # out x 2 x kh x kw
        full = np.repeat(scale, 4, axis=1)[:, : W.shape[1]]
        zp, zfull, axis, block, t = None, 0, 1, 4, TensorProto.INT4
    else:  # "uint4-per-channel" with zero points
        lo, hi = W.reshape(o, -1).min(axis=1), W.reshape(o, -1).max(axis=1)
        scale = ((hi - lo) / 15).astype(np.float32)
        zp = np.clip(np.round(-lo / scale), 0, 15).astype(np.uint8)
        full, zfull = scale[:, None, None, None], zp.astype(np.float64)[:, None, None, None]
        axis, block, t = 0, 0, TensorProto.UINT4
    lo, hi = RANGES[t]
    codes = _quantize(W, full.astype(np.float64), zfull, lo, hi)
    return codes, t, scale, zp, axis, block, np.broadcast_to(full, W.shape), zfull


def _dequantized_by_onnx(model) -> np.ndarray:
    """The kernel as onnx's reference evaluator's ``DequantizeLinear`` computes it."""
    x = np.zeros([d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim],
                 np.float32)
    (w,) = ReferenceEvaluator(model).run(["w"], {"x": x})
    return w


@pytest.fixture(scope="module")
def float_conv_records(tmp_path_factory):
    """The records of a float Conv initializer of the kernel's shape: the kinds and slices a
    QDQ kernel's records must share."""
    W = np.random.default_rng(0).standard_normal((OUT, IN, KH, KW)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "conv.weight_quantized"], ["y"], name="/conv/Conv")]
    model = _model(nodes, [_float("x", [1, IN, 5, 5])], [_float("y", ["n", "c", "h", "w"])],
                   [numpy_helper.from_array(W, "conv.weight_quantized")])
    path = tmp_path_factory.mktemp("float") / "float.onnx"
    onnx.save_model(model, path)
    return records(OnnxSource(path))


@pytest.mark.parametrize("scheme", ["int8-per-channel", "uint8-per-tensor", "int4-blocked",
                                    "uint4-per-channel"])
def test_qdq_conv_kernels_per_position(tmp_path, scheme, float_conv_records):
    """Each position of a QDQ kernel: the reference evaluator's dequantized slice, numpy's SVD
    of it, the float kernel's kinds and names, and a noise bound that holds on the measured
    error against the float kernel it was quantized from."""
    rng = np.random.default_rng(11)
    W = rng.standard_normal((OUT, IN, KH, KW)).astype(np.float32)
    codes, t, scale, zp, axis, block, full, zfull = _scheme(scheme, W)
    model = _qdq_conv(W, codes, t, scale, zp, axis, block)
    onnx.checker.check_model(model)
    onnx.save_model(model, tmp_path / "qdq.onnx")
    by_onnx = _dequantized_by_onnx(model)
    exact = (codes - zfull) * full.astype(np.float64)  # float64: exact, by hand
    # the evaluator computes in float32: ours is the exact value it rounds
    assert np.abs(by_onnx - exact).max() <= 2.0**-24 * np.abs(exact).max()

    source = OnnxSource(tmp_path / "qdq.onnx")
    (info,) = [t for t in source.tensors() if t.name == "conv.weight_quantized"]
    code = {TensorProto.INT8: "int8", TensorProto.UINT8: "uint8", TensorProto.INT4: "int4",
            TensorProto.UINT4: "uint4"}[t]
    assert (info.shape, info.dtype, info.module_type, info.quantized) == (
        (OUT, IN, KH, KW), f"qdq-{code}", "Conv2d", True)
    kernel = source.load("conv.weight_quantized")
    assert isinstance(kernel, QuantizedKernel)
    found = records(OnnxSource(tmp_path / "qdq.onnx"))
    assert set(found) == set(float_conv_records)  # one record per position, the same names
    # the scale (a blocked one is 4-D too) and zero point: quantization metadata, not kernels
    skipped = plan_source(source, AnalysisOptions(**OPTS)).skipped
    assert skipped == {"quantization metadata (scales, zero points, g_idx, absmax...)":
                       1 + (zp is not None)}
    for (i, j), _ in np.ndenumerate(np.empty((KH, KW))):
        part = kernel[:, :, i, j].decode()
        assert np.array_equal(part.values, exact[:, :, i, j])
        assert np.allclose(part.values, by_onnx[:, :, i, j], rtol=2.0**-23, atol=0)
        assert np.allclose(part.step, np.abs(full[:, :, i, j]), rtol=1e-7)
        rec, ref = found[f"conv.weight_quantized[{i},{j}]"], float_conv_records[
            f"conv.weight_quantized[{i},{j}]"]
        for key in ("kind", "kind_from", "module_type", "slice", "shape"):
            assert rec[key] == ref[key], key
        assert rec["dtype"] == f"qdq-{code}"
        sv = np.linalg.svd(exact[:, :, i, j], compute_uv=False)
        assert rec["sv_max"] == pytest.approx(sv[0], rel=1e-9)
        assert rec["sv_min"] == pytest.approx(sv[-1], rel=1e-7, abs=1e-12 * sv[0])
        # the bound of the steps (half a step per element, summed by rows and columns) holds
        # on the error against the float kernel, measured
        worst = np.abs(full[:, :, i, j]).astype(np.float64) / 2
        bound = np.sqrt(worst.sum(axis=0).max() * worst.sum(axis=1).max())
        error = exact[:, :, i, j] - W[:, :, i, j].astype(np.float64)
        assert np.all(np.abs(error) <= worst * (1 + 1e-6))
        assert rec["noise_bound"] == pytest.approx(bound, rel=1e-9)
        assert rec["noise_bound"] >= np.linalg.norm(error, 2)


def test_qdq_conv_transpose_per_axis_1(tmp_path):
    """A ``ConvTranspose`` weight (in, out, k) quantized per output channel (axis 1): sliced as
    the float one, each position the evaluator's dequantized matrix."""
    rng = np.random.default_rng(12)
    W = rng.standard_normal((IN, OUT, KH, KW)).astype(np.float32)
    scale = (np.abs(W).transpose(1, 0, 2, 3).reshape(OUT, -1).max(axis=1) / 127).astype(
        np.float32)
    full = scale[None, :, None, None].astype(np.float64)
    codes = _quantize(W, full, None, -128, 127)
    model = _qdq_conv(W, codes, TensorProto.INT8, scale, None, 1, op="ConvTranspose")
    onnx.checker.check_model(model)
    onnx.save_model(model, tmp_path / "qdq.onnx")
    by_onnx = _dequantized_by_onnx(model).astype(np.float64)
    found = records(OnnxSource(tmp_path / "qdq.onnx"))
    assert len(found) == KH * KW
    for (i, j), _ in np.ndenumerate(np.empty((KH, KW))):
        rec = found[f"conv.weight_quantized[{i},{j}]"]
        assert (rec["kind"], rec["module_type"], rec["shape"]) == ("conv", "ConvTranspose2d",
                                                                    [IN, OUT])
        sv = np.linalg.svd(by_onnx[:, :, i, j], compute_uv=False)
        assert rec["sv_max"] == pytest.approx(sv[0], rel=1e-6)  # the evaluator's float32
        assert rec["noise_bound"] >= np.linalg.norm(by_onnx[:, :, i, j] - W[:, :, i, j], 2)


def test_qdq_conv_scale_of_the_wrong_length(tmp_path):
    rng = np.random.default_rng(13)
    W = rng.standard_normal((OUT, IN, KH, KW)).astype(np.float32)
    codes = _quantize(W, 0.02, None, -128, 127)
    model = _qdq_conv(W, codes, TensorProto.INT8, np.full(IN, 0.02), None, 0)
    onnx.save_model(model, tmp_path / "bad.onnx")
    with pytest.raises(AnalyzeError) as e:
        OnnxSource(tmp_path / "bad.onnx").load("conv.weight_quantized")
    assert "a scale or zero point of shape (6,) does not fit a tensor of shape (8, 6, 3, 2) " \
           "(axis 0, block size 0)" in str(e.value) and "\n" not in str(e.value)


# -- sparse initializers ----------------------------------------------------------------------


def _sparse(name, dense: np.ndarray, coordinates: bool, data_type=TensorProto.FLOAT):
    """The ``SparseTensorProto`` of ``dense``'s nonzeros, indices linear or per axis."""
    flat = np.flatnonzero(dense)
    values = helper.make_tensor(name, data_type, [flat.size], dense.ravel()[flat].tolist())
    idx = np.stack(np.unravel_index(flat, dense.shape), axis=1) if coordinates else flat
    indices = helper.make_tensor(f"{name}_indices", TensorProto.INT64, idx.shape,
                                 idx.astype(np.int64).ravel().tolist())
    return helper.make_sparse_tensor(values, indices, dense.shape)


def _by_torch(sparse) -> np.ndarray:
    """The dense tensor as torch's COO densification builds it from onnx's arrays."""
    values = numpy_helper.to_array(sparse.values)
    idx = numpy_helper.to_array(sparse.indices)
    shape = tuple(sparse.dims)
    coords = np.stack(np.unravel_index(idx, shape)) if idx.ndim == 1 else idx.T
    return torch.sparse_coo_tensor(torch.from_numpy(coords), torch.from_numpy(values), shape,
                                   check_invariants=True).to_dense().numpy()


def _sparse_model(sparse_inits, constant=None):
    """x @ A (a sparse initializer), then Gemm with B (another, transB=1); ``constant``: a
    third one in a ``Constant`` node's ``sparse_value``, multiplied last."""
    nodes = [helper.make_node("MatMul", ["x", "a"], ["h"], name="/a/MatMul"),
             helper.make_node("Gemm", ["h", "b"], ["y"], name="/b/Gemm", transB=1)]
    out = "y"
    if constant is not None:
        nodes += [helper.make_node("Constant", [], ["c"], sparse_value=constant),
                  helper.make_node("MatMul", ["y", "c"], ["z"], name="/c/MatMul")]
        out = "z"
    graph = helper.make_graph(nodes, "g", [_float("x", [1, 40])], [_float(out, ["n", "m"])],
                              sparse_initializer=sparse_inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _sparse_dense(rng, shape, density=0.3):
    W = rng.standard_normal(shape).astype(np.float32)
    return W * (rng.random(shape) < density)


def test_sparse_initializers_densified(tmp_path):
    """Linear and per-axis indices, and a sparse ``Constant``: densified as torch densifies the
    same COO tensor, oriented as their ops use them, records equal numpy's SVD."""
    rng = np.random.default_rng(21)
    A, B, C = _sparse_dense(rng, (40, 24)), _sparse_dense(rng, (16, 24)), _sparse_dense(
        rng, (16, 12), 0.5)
    sa, sb, sc = _sparse("a", A, False), _sparse("b", B, True), _sparse("c", C, False)
    model = _sparse_model([sa, sb], sc)
    onnx.checker.check_model(model)
    onnx.save_model(model, tmp_path / "sparse.onnx")
    source = OnnxSource(tmp_path / "sparse.onnx")
    infos = {t.name: t for t in source.tensors()}
    assert {n: (t.shape, t.dtype, t.module_type) for n, t in infos.items()} == {
        "a": ((24, 40), "float32", "Linear"), "b": ((16, 24), "float32", "Linear"),
        "c": ((12, 16), "float32", "Linear")}
    for name, sparse, op_view in (("a", sa, np.transpose), ("b", sb, np.asarray),
                                  ("c", sc, np.transpose)):
        dense = _by_torch(sparse)
        loaded = source.load(name)
        assert loaded.dtype == np.float32 and np.array_equal(loaded, op_view(dense))
    found = records(source)
    for name, W in (("a", A.T), ("b", B), ("c", C.T)):
        assert_record_matches_reference(found[name], W)


@pytest.mark.parametrize("case, fragment", [
    ("out_of_range", "index 960 of value 3 is outside its 960 elements"),
    ("out_of_range_axis", "index 24 of value 1 on axis 1 is outside its size 24"),
    ("unsorted", "the index of value 2 comes before the one before (ONNX: ascending, no repeats)"),
    ("repeated", "the index of value 2 repeats the one before"),
])
def test_sparse_indices_checked_on_load(tmp_path, case, fragment):
    """Indices that onnx's checker refuses are one line when the tensor is read."""
    rng = np.random.default_rng(22)
    sparse = _sparse("a", _sparse_dense(rng, (40, 24), 0.05), case == "out_of_range_axis")
    idx = numpy_helper.to_array(sparse.indices).copy()
    if case == "out_of_range":
        idx[3] = 40 * 24
    elif case == "out_of_range_axis":
        idx[1, 1] = 24
    elif case == "unsorted":
        idx[[1, 2]] = idx[[2, 1]]
    else:
        idx[2] = idx[1]
    sparse.indices.CopyFrom(numpy_helper.from_array(idx, "a_indices"))
    model = _sparse_model([sparse, _sparse("b", _sparse_dense(rng, (16, 24)), True)])
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    onnx.save_model(model, tmp_path / "bad.onnx")
    source = OnnxSource(tmp_path / "bad.onnx")  # declarations fine: listed
    with pytest.raises(AnalyzeError) as e:
        source.load("a")
    assert fragment in str(e.value) and "sparse tensor 'a'" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("case, fragment", [
    ("count", "indices of shape [4] for 5 values of a 2-D tensor (ONNX: [5] or [5, 2])"),
    ("rank", "indices of shape [5, 3] for 5 values of a 2-D tensor"),
    ("no_indices", "5 values and no indices"),
    ("int32", "its indices are of ONNX type 6, not int64"),
    ("zero_dim", "a sparse tensor of dense shape [40, 0] (ONNX needs positive dimensions)"),
    ("too_many", "5 values in a dense shape [2, 2] of 4 elements"),
])
def test_sparse_declarations_checked_when_opened(tmp_path, case, fragment):
    values = helper.make_tensor("a", TensorProto.FLOAT, [5], [1.0, 2, 3, 4, 5])
    idx = np.array([0, 1, 2, 3, 4], np.int64)
    dims = [40, 24]
    if case == "count":
        idx = idx[:4]
    elif case == "rank":
        idx = np.zeros((5, 3), np.int64)
    elif case == "zero_dim":
        dims = [40, 0]
    elif case == "too_many":
        dims = [2, 2]
    indices = numpy_helper.from_array(idx.astype(np.int32) if case == "int32" else idx, "i")
    sparse = helper.make_sparse_tensor(values, indices, dims)
    if case == "no_indices":
        sparse.ClearField("indices")
    model = _sparse_model([sparse, _sparse("b", np.eye(16, 24, dtype=np.float32), True)])
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    onnx.save_model(model, tmp_path / "bad.onnx")
    with pytest.raises(AnalyzeError) as e:
        OnnxSource(tmp_path / "bad.onnx")
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_absurd_dense_shape_refused_before_allocating(tmp_path):
    """10**7 x 10**7 with 2 values: listed; read, its dense size is refused in one line."""
    values = helper.make_tensor("a", TensorProto.FLOAT, [2], [1.0, 2.0])
    indices = numpy_helper.from_array(np.array([0, 10**14 - 1], np.int64), "i")
    model = _sparse_model([helper.make_sparse_tensor(values, indices, [10**7, 10**7]),
                           _sparse("b", np.eye(16, 24, dtype=np.float32), True)])
    onnx.checker.check_model(model)  # valid ONNX: only its size is absurd
    onnx.save_model(model, tmp_path / "absurd.onnx")
    source = OnnxSource(tmp_path / "absurd.onnx")
    assert source.tensors()[0].shape == (10**7, 10**7)
    with pytest.raises(AnalyzeError, match=r"sparse tensor 'a' \(dense 10000000 x 10000000\) "
                                           r"needs 363.8 TiB of memory"):
        source.load("a")


def test_qdq_conv_against_its_float_base(tmp_path):
    """``--base`` the float kernel a QDQ one was quantized from: each position's measured error
    is numpy's ||W_q - W||_2 of that slice (the quantized slice decoded for the comparison)."""
    from safetensors.numpy import save_file

    from allennlp_analyze import analyze

    W = np.random.default_rng(14).standard_normal((OUT, IN, KH, KW)).astype(np.float32)
    codes, t, scale, zp, axis, block, full, zfull = _scheme("int8-per-channel", W)
    onnx.save_model(_qdq_conv(W, codes, t, scale, zp, axis, block), tmp_path / "qdq.onnx")
    save_file({"conv.weight_quantized": W}, tmp_path / "base.safetensors")
    found = {r.name: r for r in analyze(str(tmp_path / "qdq.onnx"),
                                        base=str(tmp_path / "base.safetensors"),
                                        **OPTS).records}
    assert len(found) == KH * KW
    for (i, j), _ in np.ndenumerate(np.empty((KH, KW))):
        E = (codes - zfull)[:, :, i, j] * full[:, :, i, j].astype(np.float64) - W[:, :, i, j]
        rec = found[f"conv.weight_quantized[{i},{j}]"]
        assert rec.delta_sv_max == pytest.approx(np.linalg.norm(E, 2), rel=1e-12)


def test_qdq_rows_decoded_alone():
    """A row block of a QDQ matrix dequantizes that block only: peak memory (tracemalloc, which
    numpy reports to) far below the whole matrix in float64, blocked scales included."""
    import tracemalloc

    from allennlp_analyze.sources.onnx_qdq import Dequantize, QdqCodes, QdqMatrix

    rng = np.random.default_rng(15)
    codes = rng.integers(-8, 8, (1024, 1024)).astype(np.int8)
    scale = rng.random((1024, 32)).astype(np.float32)  # blocks of 32 along axis 1
    q = QdqCodes(codes, scale, None, Dequantize("s", None, 1, 32), "w")
    for row_axis in (0, 1):  # as stored, and transposed (a MatMul's B)
        m = QdqMatrix(q, "qdq-int4", (None, None), row_axis)
        tracemalloc.start()
        part = m.rows(100, 108)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        stored = codes if row_axis == 0 else codes.T
        blocks = np.repeat(scale, 32, axis=1) if row_axis == 0 else np.repeat(scale, 32, axis=1).T
        assert np.array_equal(part.values, stored[100:108] * blocks[100:108].astype(np.float64))
        assert peak < 8 * 1024 * 1024 / 16  # the whole matrix in float64 / 16


def test_qdq_recurrent_weight_per_direction(tmp_path):
    """A bidirectional LSTM's W (2, 4H, in) quantized per row (axis 1): each direction's matrix
    as the reference evaluator dequantizes it, rows and columns read alone."""
    H_, I_ = 4, 5
    rng = np.random.default_rng(16)
    W = rng.standard_normal((2, 4 * H_, I_)).astype(np.float32)
    scale = (np.abs(W).max(axis=(0, 2)) / 127).astype(np.float32)
    codes = _quantize(W, scale[None, :, None].astype(np.float64), None, -128, 127)
    R = numpy_helper.from_array(rng.standard_normal((2, 4 * H_, H_)).astype(np.float32), "r")
    nodes = [helper.make_node("DequantizeLinear", ["lstm.w_quantized", "lstm.w_scale"], ["w"],
                              axis=1),
             helper.make_node("LSTM", ["x", "w", "r"], ["y"], name="/lstm/LSTM",
                              hidden_size=H_, direction="bidirectional")]
    model = _model(nodes, [_float("x", [3, 1, I_])], [_float("y", [3, 2, 1, H_])],
                   [numpy_helper.from_array(codes.astype(np.int8), "lstm.w_quantized"),
                    numpy_helper.from_array(scale, "lstm.w_scale"), R], opset=21)
    onnx.checker.check_model(model)
    onnx.save_model(model, tmp_path / "lstm.onnx")
    (by_onnx,) = ReferenceEvaluator(model).run(["w"], {"x": np.zeros((3, 1, I_), np.float32)})
    source = OnnxSource(tmp_path / "lstm.onnx")
    for d, name in enumerate(("lstm.w_quantized", "lstm.w_quantized_reverse")):
        q = source.load(name)
        assert q.shape == (4 * H_, I_) and q.scheme == "qdq-int8"
        exact = codes[d] * scale[:, None].astype(np.float64)
        assert np.array_equal(q.rows(0, 4 * H_).values, exact)
        assert np.array_equal(q.columns(1, 3).values, exact[:, 1:3])
        assert np.allclose(q.rows(2, 7).values, by_onnx[d, 2:7], rtol=2.0**-23, atol=0)
