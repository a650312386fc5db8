"""ONNX sources against the onnx package's own reading (``numpy_helper.to_array``), numpy's SVD
and the records of the same parameters read from torch: files exported by ``torch.onnx.export``
from real module types, and graphs built with ``onnx.helper``."""
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from conftest import assert_record_matches_reference  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import hostile_inputs as H  # noqa: E402
from allennlp_analyze import analyze  # noqa: E402
from allennlp_analyze.errors import AnalyzeError  # noqa: E402
from allennlp_analyze.sources.onnx_file import OnnxSource  # noqa: E402

#: Every matrix, square ones and each convolution position included, one worker.
OPTS = dict(min_q=1.0, include=("embeddings", "conv"), conv_min_dim=1, workers=1)
#: Record fields that say where a record came from rather than what the matrix is: the model's
#: label, and the evidence of its kind (an ONNX graph names the op: ``module``; a state dict
#: only has names and shapes).
ORIGIN = ("model", "kind_from", "module_type")


def records(source, **options) -> dict:
    return {r["name"]: r for r in analyze(source, **{**OPTS, **options}).to_dicts()}


def same_record(a: dict, b: dict, origin: bool = False, skip: tuple = ()) -> None:
    """Equal records, field by field (``origin``: the fields in :data:`ORIGIN` too), but
    ``skip``."""
    skip = skip + (("model",) if origin else ORIGIN)
    assert {k: v for k, v in a.items() if k not in skip} == \
        {k: v for k, v in b.items() if k not in skip}


def export(module: nn.Module, args, path, **kwargs):
    """``torch.onnx.export`` with the TorchScript-based exporter (``dynamo=False``: the
    dynamo exporter needs onnxscript) of ``module`` in eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, str(path), dynamo=False, **kwargs)
    return path


def stored_arrays(path) -> list:
    """Every initializer and Constant-node tensor of the model at ``path``, as onnx reads it."""
    model = onnx.load(str(path))
    found = [numpy_helper.to_array(t) for t in model.graph.initializer]
    found += [numpy_helper.to_array(a.t) for n in model.graph.node if n.op_type == "Constant"
              for a in n.attribute if a.name == "value"]
    return found


def stored_as(param: np.ndarray, arrays: list) -> np.ndarray:
    """The stored ONNX array holding the torch parameter ``param`` as the model uses it: the
    array itself, or its transpose (a MatMul weight is stored in x out)."""
    for a in arrays:
        for candidate in (a, a.T):
            if candidate.shape == param.shape and np.array_equal(candidate, param):
                return candidate
    raise AssertionError(f"no stored tensor holds a parameter of shape {param.shape}")


class Tagger(nn.Module):
    """Embedding, LSTM, CNN and Linear layers of one small model."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 12)
        self.lstm = nn.LSTM(12, 10, batch_first=True)
        self.conv = nn.Conv2d(3, 6, 3)
        self.conv2 = nn.Conv2d(6, 4, 2)
        self.fc = nn.Linear(10, 7)

    def forward(self, ids, image):
        h, _ = self.lstm(self.emb(ids))
        return self.fc(h), self.conv2(torch.relu(self.conv(image)))


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    torch.manual_seed(0)
    model = Tagger()
    path = export(model, (torch.randint(0, 40, (2, 5)), torch.randn(1, 3, 8, 8)),
                  tmp_path_factory.mktemp("onnx") / "tagger.onnx")
    return model, path


def test_lstm_cnn_export_equals_numpy_and_the_state_dict(tagger):
    model, path = tagger
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    ours = records(OnnxSource(path))
    theirs = records(model.state_dict())
    arrays = stored_arrays(path)
    by_param = {n: n.partition("[")[0] for n in ours}
    assert set(ours) == set(theirs)
    for name, rec in ours.items():
        param = state[by_param[name]]
        if rec["slice"] is None:
            W = stored_as(param, arrays) if "lstm" not in name else param
            assert_record_matches_reference(rec, W)
        if "lstm" in name:  # ONNX stacks the gates i, o, f, c; torch i, f, g, o: rows permuted
            assert (rec["kind"], rec["module_type"]) == ("recurrent", "LSTM")
            assert rec["sv_max"] == pytest.approx(theirs[name]["sv_max"], rel=1e-12)
            assert rec["sv_min"] == pytest.approx(theirs[name]["sv_min"], rel=1e-9)
            assert rec["rank_loose"] == theirs[name]["rank_loose"]
        else:
            same_record(rec, theirs[name])
    assert ours["fc.weight"]["kind"] == "linear" and ours["fc.weight"]["shape"] == [7, 10]
    assert ours["conv.weight[1,2]"]["kind"] == "conv"
    assert ours["emb.weight"]["kind"] == "embedding"


def test_lstm_gates_split_in_torch_names(tagger):
    """``--split-fused``: each gate of ONNX's i, o, f, c stack is the same rows as torch's
    gate of that name (c is torch's g), so the gate records are the state dict's, bit for bit."""
    model, path = tagger
    ours = records(OnnxSource(path), split_fused=True, match=("lstm",))
    theirs = records(model.state_dict(), split_fused=True, match=("lstm",))
    assert set(ours) == set(theirs) == {f"lstm.weight_{w}_l0[{g}]" for w in ("ih", "hh")
                                        for g in "ifgo"}
    W = numpy_helper.to_array(next(t for t in onnx.load(str(path)).graph.initializer
                                   if t.dims[1:] == [40, 12]))[0]
    assert_record_matches_reference(ours["lstm.weight_ih_l0[o]"], W[10:20])
    for name in ours:
        same_record(ours[name], theirs[name])


def test_weights_followed_through_transpose_slice_and_concat(tmp_path):
    """Exported without constant folding, the parameters keep their names and reach their ops
    through ``Transpose`` (Linear) and ``Slice`` / ``Concat`` (the LSTM's gates reordered):
    the state dict's records, gates included (the stored rows are torch's)."""
    torch.manual_seed(0)
    model = Tagger()
    path = export(model, (torch.randint(0, 40, (2, 5)), torch.randn(1, 3, 8, 8)),
                  tmp_path / "unfolded.onnx", do_constant_folding=False)
    names = {t.name for t in onnx.load(str(path)).graph.initializer}
    assert {"fc.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0"} <= names
    source = OnnxSource(path)
    kinds = {t.name: t.module_type for t in source.tensors()}
    assert kinds["fc.weight"] == "Linear" and kinds["conv.weight"] == "Conv2d"
    assert kinds["lstm.weight_ih_l0"] is None  # rows rearranged on the way: its name decides
    ours = records(source, split_fused=True)
    theirs = records(model.state_dict(), split_fused=True)
    assert set(ours) == set(theirs)
    for name in ours:
        same_record(ours[name], theirs[name])


class Recurrent(nn.Module):
    """A 2-layer bidirectional LSTM feeding a GRU."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 5, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(10, 7, batch_first=True)

    def forward(self, x):
        h, _ = self.lstm(x)
        return self.gru(h)[0]


def test_bidirectional_layers_and_gru_gates(tmp_path):
    """ONNX's direction axis gives torch's ``_reverse`` matrices, its layers torch's ``_l1``,
    and GRU's z, r, h gates are torch's z, r, n rows."""
    torch.manual_seed(0)
    model = Recurrent()
    path = export(model, (torch.randn(2, 4, 6),), tmp_path / "rnn.onnx")
    for split in (False, True):
        ours = records(OnnxSource(path), split_fused=split)
        theirs = records(model.state_dict(), split_fused=split)
        assert set(ours) == set(theirs) and len(ours) == (8 + 2) * (4 if split else 1) - 2 * split
        for name, rec in ours.items():
            assert rec["kind"] == "recurrent"
            if split:
                same_record(rec, theirs[name])
            else:  # the whole stack, its rows in another order
                assert rec["sv_max"] == pytest.approx(theirs[name]["sv_max"], rel=1e-12)
                assert rec["sv_min"] == pytest.approx(theirs[name]["sv_min"], rel=1e-9)


def test_bert_encoder_export(tmp_path):
    """A BERT-shaped encoder (``transformers.BertConfig``, random init): every matrix under its
    state-dict name, with the state dict's record, equal to numpy on the stored tensor."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=48,
                                     max_position_embeddings=24, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.BertModel(config)
    path = export(model, (torch.randint(0, 50, (1, 8)),), tmp_path / "bert.onnx")
    ours = records(OnnxSource(path))
    theirs = records(model.state_dict())
    assert set(ours) == set(theirs) and len(ours) == 16
    arrays = stored_arrays(path)
    state = model.state_dict()
    for name, rec in ours.items():
        same_record(rec, theirs[name])
        assert_record_matches_reference(rec, stored_as(state[name].numpy(), arrays))
    assert ours["encoder.layer.1.intermediate.dense.weight"]["kind"] == "linear"
    assert ours["encoder.layer.1.intermediate.dense.weight"]["shape"] == [48, 32]
    assert ours["embeddings.word_embeddings.weight"]["kind"] == "embedding"


def _model(nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _float(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_constant_weights_inside_if_branches(tmp_path):
    rng = np.random.default_rng(1)
    W1, W2 = rng.standard_normal((16, 8)), rng.standard_normal((8, 16))

    def branch(name, weight, node):
        const = helper.make_node("Constant", [], [name],
                                 value=numpy_helper.from_array(weight.astype(np.float32), name))
        return helper.make_graph([const, node], f"{name}_branch", [], [_float("y", [1, 8])])

    then = branch("then.proj.weight", W1,
                  helper.make_node("MatMul", ["x", "then.proj.weight"], ["y"]))
    other = branch("else.proj.weight", W2,
                   helper.make_node("Gemm", ["x", "else.proj.weight"], ["y"], transB=1))
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)
    model = _model([node], [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                            _float("x", [1, 16])], [_float("y", [1, 8])])
    onnx.checker.check_model(model)
    onnx.save_model(model, tmp_path / "if.onnx")
    source = OnnxSource(tmp_path / "if.onnx")
    assert sorted((t.name, t.shape, t.module_type) for t in source.tensors()) == [
        ("else.proj.weight", (8, 16), "Linear"), ("then.proj.weight", (8, 16), "Linear")]
    ours = records(source)
    branches = {n.output[0]: numpy_helper.to_array(n.attribute[0].t)
                for a in node.attribute for n in a.g.node if n.op_type == "Constant"}
    # MatMul's B is in x out: the record is its transpose; Gemm with transB=1 takes out x in
    assert_record_matches_reference(ours["then.proj.weight"], branches["then.proj.weight"].T)
    assert_record_matches_reference(ours["else.proj.weight"], branches["else.proj.weight"])
    assert {r["kind"] for r in ours.values()} == {"linear"}


def test_gemm_orientation_and_broadcast_vectors(tmp_path):
    """``Gemm``'s transA / transB and a Transpose on the way decide the record's orientation
    (out x in); a [1, n] weight of an ``Add`` is a vector, one of a ``MatMul`` a matrix."""
    rng = np.random.default_rng(2)
    A, B, C = (rng.standard_normal(s).astype(np.float32) for s in ((6, 10), (10, 9), (9, 12)))
    row, head = (rng.standard_normal(s).astype(np.float32) for s in ((1, 12), (12, 1)))
    nodes = [helper.make_node("Gemm", ["A", "x"], ["h1"], transA=1, name="g1"),  # A^T x: out 10
             helper.make_node("Transpose", ["B"], ["Bt"], perm=[1, 0]),
             helper.make_node("Gemm", ["h1", "Bt"], ["h2"], transA=1, transB=1, name="g2"),
             helper.make_node("MatMul", ["h2", "C"], ["h3"], name="m3"),
             helper.make_node("Add", ["h3", "row"], ["h4"]),
             helper.make_node("MatMul", ["h4", "head"], ["y"], name="m4")]
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((A, "A"), (B, "B"), (C, "C"), (row, "row"), (head, "head"))]
    model = _model(nodes, [_float("x", [6, 1])], [_float("y", [1, 1])], inits)
    onnx.save_model(model, tmp_path / "gemm.onnx")
    source = OnnxSource(tmp_path / "gemm.onnx")
    onnx.checker.check_model(model, full_check=True)
    shapes = {t.name: (t.shape, t.module_type) for t in source.tensors()}
    assert shapes == {"A": ((10, 6), "Linear"), "B": ((9, 10), "Linear"),
                      "C": ((12, 9), "Linear"), "row": ((1, 12), "Add"),
                      "head": ((1, 12), "Linear")}
    ours = records(source)
    assert_record_matches_reference(ours["A"], A.T)  # used as A^T: 10 x 6
    assert_record_matches_reference(ours["B"], B.T)  # B^T^T in x out, so its transpose
    assert_record_matches_reference(ours["C"], C.T)
    assert "row" not in ours and ours["head"]["kind"] == "linear"
    assert ours["head"]["shape"] == [1, 12]
    assert dict(analyze(source, **OPTS).summary.skipped) == {
        "not a matrix (a vector: one dimension above 1)": 1}


@pytest.mark.parametrize("data_type, dtype", [
    (TensorProto.FLOAT16, "float16"), (TensorProto.BFLOAT16, "bfloat16"),
    (TensorProto.FLOAT8E4M3FN, "float8_e4m3fn"), (TensorProto.FLOAT8E5M2, "float8_e5m2")])
def test_narrow_weights_behind_cast_keep_their_storage(tmp_path, data_type, dtype):
    rng = np.random.default_rng(3)
    values = rng.standard_normal((12, 20)).astype(np.float32)
    tensor = helper.make_tensor("w16", data_type, values.shape,
                                values.astype(np.float16) if dtype == "float16" else values)
    stored = numpy_helper.to_array(tensor)
    nodes = [helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="/proj/MatMul")]
    onnx.save_model(_model(nodes, [_float("x", [1, 12])], [_float("y", [1, 20])], [tensor]),
                    tmp_path / "narrow.onnx")
    source = OnnxSource(tmp_path / "narrow.onnx")
    assert [(t.name, t.shape, t.dtype) for t in source.tensors()] == [("w16", (20, 12), dtype)]
    rec = records(source)["w16"]
    W = stored.T.astype(np.float64)
    assert np.array_equal(source.load("w16"), W)
    if dtype == "float16":
        assert_record_matches_reference(rec, stored.T)
    sv = np.linalg.svd(W, compute_uv=False)
    assert rec["dtype"] == dtype and rec["kind"] == "linear"
    assert rec["sv_max"] == pytest.approx(sv[0], rel=1e-9)
    assert rec["sv_min"] == pytest.approx(sv[-1], rel=1e-7)
    # the storage-noise floor of the narrow dtype, as for the same values in a state dict
    theirs = records({"w16": torch.from_numpy(stored.T.astype(np.float32)).to(
        getattr(torch, dtype))})["w16"]
    same_record(rec, theirs, skip=("kind",))  # the state dict has no op: a "matrix"
    assert rec["noise_floor"] > 1e-4 * rec["sv_max"]


def test_external_data_inside_the_folder(tmp_path):
    rng = np.random.default_rng(4)
    weights = {"l1.weight": rng.standard_normal((16, 24)),
               "l2.weight": rng.standard_normal((24, 8))}
    path = H.onnx_external(tmp_path / "m", weights)
    assert (tmp_path / "m" / "weights.bin").stat().st_size == 4 * (16 * 24 + 24 * 8)
    ours = records(OnnxSource(path))
    model = onnx.load(str(path))  # the onnx package reads the external data itself
    for t in model.graph.initializer:
        assert_record_matches_reference(ours[t.name], numpy_helper.to_array(t).T)


@pytest.mark.parametrize("location, fragment", [
    ("../x", "outside the model's folder"), ("/etc/passwd", "outside the model's folder"),
    ("link.bin", "outside the model's folder"), ("missing.bin", "cannot read")])
def test_external_data_outside_the_folder_is_refused(tmp_path, location, fragment):
    weights = {"w": np.ones((4, 3))}
    (tmp_path / "x").write_bytes(b"\0" * 48)
    path = H.onnx_external(tmp_path / "m", weights, location=location)
    (tmp_path / "m" / "link.bin").symlink_to(tmp_path / "x")
    with pytest.raises(AnalyzeError) as e:  # when opened, before anything is read
        OnnxSource(path)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_hostile_onnx_files(tmp_path):
    """Truncated protobuf, an offset past the external file's end, absurd dims: one line."""
    rng = np.random.default_rng(5)
    good = H.onnx_matmul_model({"w": rng.standard_normal((64, 32))}).SerializeToString()
    (tmp_path / "cut.onnx").write_bytes(good[: len(good) // 2])
    with pytest.raises(AnalyzeError, match="not a valid ONNX model .truncated or corrupt"):
        OnnxSource(tmp_path / "cut.onnx")
    past = H.onnx_external(tmp_path / "past", {"w": np.ones((4, 3))}, offset=10**9)
    with pytest.raises(AnalyzeError, match=r"weights.bin is truncated .tensor 'w' ends at byte "
                                           r"1000000048, the file holds 48"):
        OnnxSource(past)
    source = OnnxSource(H.onnx_absurd_dims(tmp_path / "absurd.onnx"))
    assert source.tensors()[0].shape == (10**12, 10**12)
    with pytest.raises(AnalyzeError, match=r"needs 4000000000000000000000000 bytes, its data "
                                           r"hold 16"):
        source.load("w")


def test_same_records_in_every_format(tmp_path):
    """One small model as a torch state dict, safetensors, TorchScript, ONNX with initializers
    and ONNX with Constant nodes: identical records (ONNX's identical to the field with the
    module's own, kind evidence and module types included)."""
    from safetensors.torch import save_file

    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(30, 16)
            self.fc1 = nn.Linear(16, 40)
            self.fc2 = nn.Linear(40, 12)

        def forward(self, ids):
            return self.fc2(torch.relu(self.fc1(self.emb(ids))))

    torch.manual_seed(0)
    model = Small().eval()
    torch.save(model.state_dict(), tmp_path / "small.pt")
    save_file(model.state_dict(), tmp_path / "small.safetensors")
    export(model, (torch.randint(0, 30, (2, 3)),), tmp_path / "small.onnx")
    constants = onnx.load(str(tmp_path / "small.onnx"))
    nodes = [helper.make_node("Constant", [], [t.name], value=t)
             for t in constants.graph.initializer]
    del constants.graph.initializer[:]
    nodes += list(constants.graph.node)
    del constants.graph.node[:]
    constants.graph.node.extend(nodes)
    onnx.checker.check_model(constants)
    onnx.save_model(constants, tmp_path / "small_constants.onnx")
    assert not onnx.load(str(tmp_path / "small_constants.onnx")).graph.initializer

    with warnings.catch_warnings():  # torch.jit.script is deprecated, TorchScript files are not
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(model).save(str(tmp_path / "small_scripted.pt"))

    from allennlp_analyze.sources import open_source

    reference = records(model)
    assert set(reference) == {"emb.weight", "fc1.weight", "fc2.weight"}
    for name in ("small.pt", "small.safetensors", "small_scripted.pt"):
        found = records(open_source(tmp_path / name))
        assert set(found) == set(reference)
        for key in reference:
            same_record(found[key], reference[key])
    for name in ("small.onnx", "small_constants.onnx"):
        found = records(OnnxSource(tmp_path / name))
        assert set(found) == set(reference)
        for key in reference:
            same_record(found[key], reference[key], origin=True)


def _qdq_model(W: np.ndarray, codes: np.ndarray, scale: np.ndarray, zero_point, axis: int,
               block_size: int = 0):
    """x @ DequantizeLinear(codes, scale, zero_point): the weight of a MatMul (in x out)."""
    inits = [numpy_helper.from_array(codes, "proj.weight_quantized"),
             numpy_helper.from_array(scale.astype(np.float32), "proj.weight_scale")]
    inputs = ["proj.weight_quantized", "proj.weight_scale"]
    if zero_point is not None:
        inits.append(numpy_helper.from_array(zero_point, "proj.weight_zero_point"))
        inputs.append("proj.weight_zero_point")
    attrs = dict(axis=axis, **({"block_size": block_size} if block_size else {}))
    nodes = [helper.make_node("DequantizeLinear", inputs, ["w"], **attrs),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="/proj/MatMul")]
    return _model(nodes, [_float("x", [1, W.shape[0]])], [_float("y", [1, W.shape[1]])], inits,
                  opset=21)


def _quantize(W, scale, zero_point, lo, hi):
    """ONNX QuantizeLinear by hand: round half to even, saturate."""
    return np.clip(np.rint(W / scale) + (0 if zero_point is None else zero_point), lo, hi)


def test_qdq_weights_against_their_float_base(tmp_path):
    """``--base`` the float weights a QDQ int8 model was quantized from: the measured error is
    numpy's ||W_q - W||_2 on onnx's own codes and scales (the quantized matrix is decoded by
    rows for the comparison, as for GGUF and the packed formats)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(8)
    W = rng.standard_normal((64, 32)).astype(np.float32)  # in x out, as MatMul's B
    scale = (np.abs(W).max(axis=0) / 127).astype(np.float32)
    codes = _quantize(W, scale, None, -128, 127).astype(np.int8)
    onnx.save_model(_qdq_model(W, codes, scale, None, 1), tmp_path / "qdq.onnx")
    save_file({"proj.weight_quantized": np.ascontiguousarray(W.T)}, tmp_path / "base.safetensors")
    rec = analyze(str(tmp_path / "qdq.onnx"), base=str(tmp_path / "base.safetensors"),
                  min_q=1).records[0]
    stored = {t.name: numpy_helper.to_array(t)
              for t in onnx.load(str(tmp_path / "qdq.onnx")).graph.initializer}
    Wq = stored["proj.weight_quantized"].astype(np.float64) * stored["proj.weight_scale"]
    E = Wq.T - W.T.astype(np.float64)
    assert rec.dtype == "qdq-int8"
    assert rec.delta_sv_max == pytest.approx(np.linalg.norm(E, 2), rel=1e-12)
    assert rec.delta_rel == pytest.approx(
        np.linalg.norm(E) / np.linalg.norm(W.astype(np.float64)), rel=1e-12)


@pytest.mark.parametrize("scheme", ["int8-per-channel", "uint8-per-tensor", "int4-blocked"])
def test_qdq_weights_dequantized_with_their_steps(tmp_path, scheme):
    rng = np.random.default_rng(6)
    W = rng.standard_normal((24, 16)).astype(np.float32)  # in x out, as MatMul's B
    if scheme == "int8-per-channel":
        scale = np.abs(W).max(axis=0) / 127  # one per output column (axis 1)
        zp, axis, block, dtype = None, 1, 0, np.int8
        codes = _quantize(W, scale, None, -128, 127)
        steps = np.broadcast_to(scale, W.shape)
    elif scheme == "uint8-per-tensor":
        scale = np.array((W.max() - W.min()) / 255, dtype=np.float32)
        zp = np.array(np.round(-W.min() / scale), dtype=np.uint8)
        axis, block, dtype = 1, 0, np.uint8
        codes = _quantize(W, scale, zp.astype(np.float64), 0, 255)
        steps = np.full(W.shape, float(scale))
    else:  # int4, blocks of 8 rows (the input axis) per column
        blocks = W.reshape(3, 8, 16)
        scale = np.abs(blocks).max(axis=1) / 7  # 3 x 16
        zp, axis, block, dtype = None, 0, 8, np.int8
        full = np.repeat(scale, 8, axis=0)
        codes = _quantize(W, full, None, -8, 7)
        steps = full
    model = _qdq_model(W, codes.astype(dtype) if block == 0 else codes.astype(np.int8), scale,
                       zp, axis, block)
    if block:  # stored as packed int4
        model.graph.initializer[0].CopyFrom(helper.make_tensor(
            "proj.weight_quantized", TensorProto.INT4, codes.shape, codes.astype(np.int8).ravel()))
    onnx.checker.check_model(model)
    onnx.save_model(model, tmp_path / "qdq.onnx")
    source = OnnxSource(tmp_path / "qdq.onnx")
    stored = {t.name: numpy_helper.to_array(t)
              for t in onnx.load(str(tmp_path / "qdq.onnx")).graph.initializer}
    code_dtype = {"int8-per-channel": "int8", "uint8-per-tensor": "uint8",
                  "int4-blocked": "int4"}[scheme]
    info = next(t for t in source.tensors() if t.name == "proj.weight_quantized")
    assert (info.shape, info.dtype, info.module_type, info.quantized) == (
        (16, 24), f"qdq-{code_dtype}", "Linear", True)
    # onnx's own arrays, dequantized by the operator's definition, in float64
    x = stored["proj.weight_quantized"].astype(np.float64)
    s = np.asarray(stored["proj.weight_scale"], dtype=np.float64)
    s_full = np.repeat(s, 8, axis=0) if block else s
    z = stored.get("proj.weight_zero_point")
    expected = (x - (0 if z is None else z.astype(np.float64))) * s_full
    q = source.load("proj.weight_quantized")
    rows = q.rows(0, 16)
    assert q.shape == (16, 24) and q.scheme == f"qdq-{code_dtype}" and q.bound_reason is None
    assert np.array_equal(rows.values, expected.T)
    assert np.array_equal(q.rows(3, 9).values, expected.T[3:9])
    assert np.allclose(rows.step, np.asarray(steps, np.float64).T, rtol=1e-7)
    # the steps against the exact quantization error of this matrix: every element within half
    # its step (round to nearest), and the noise model's formulas (storage noise, the step in
    # place of the ulp) bound and estimate its spectral norm
    E = expected.T - W.T.astype(np.float64)
    assert np.all(np.abs(E) <= rows.worst * (1 + 1e-6)) and np.array_equal(rows.worst,
                                                                           rows.step / 2)
    exact = np.linalg.norm(E, 2)
    bound = np.sqrt(rows.worst.sum(axis=0).max() * rows.worst.sum(axis=1).max())
    estimate = (np.sqrt((rows.step ** 2 / 12).sum(axis=1).max())
                + np.sqrt((rows.step ** 2 / 12).sum(axis=0).max()))
    assert bound >= exact and 0.5 * exact <= estimate <= 2.5 * exact


@pytest.mark.skipif(not hasattr(__import__("allennlp_analyze.quantized").quantized,
                                "QuantizedView"),
                    reason="the analysis of quantized matrices (issue 22's pipeline) is not "
                           "on this branch yet: QDQ weights are listed, not analyzed")
def test_qdq_records(tmp_path):
    """A QDQ int8 weight's record: numpy's SVD of the dequantized matrix, and the noise floor
    and bound of its quantization steps."""
    rng = np.random.default_rng(7)
    W = rng.standard_normal((40, 24)).astype(np.float32)
    scale = (np.abs(W).max(axis=0) / 127).astype(np.float32)
    codes = _quantize(W, scale, None, -128, 127).astype(np.int8)
    onnx.save_model(_qdq_model(W, codes, scale, None, 1), tmp_path / "qdq.onnx")
    rec = records(OnnxSource(tmp_path / "qdq.onnx"))["proj.weight_quantized"]
    Wq = (codes.astype(np.float64) * scale.astype(np.float64)).T  # out x in
    sv = np.linalg.svd(Wq, compute_uv=False)
    step = np.broadcast_to(scale.astype(np.float64), W.shape).T
    assert (rec["dtype"], rec["kind"], rec["shape"]) == ("qdq-int8", "linear", [24, 40])
    assert rec["sv_max"] == pytest.approx(sv[0], rel=1e-9)
    assert rec["sv_min"] == pytest.approx(sv[-1], rel=1e-7)
    bound = np.sqrt((step / 2).sum(axis=0).max() * (step / 2).sum(axis=1).max())
    assert rec["noise_bound"] == pytest.approx(bound, rel=1e-12)
    assert rec["noise_bound"] >= np.linalg.norm(Wq - W.T, 2)
    estimate = (np.sqrt((step ** 2 / 12).sum(axis=1).max())
                + np.sqrt((step ** 2 / 12).sum(axis=0).max()))
    assert rec["noise_floor"] >= estimate * (1 - 1e-12)
    assert rec["rank_noise"] == np.sum(sv > rec["noise_floor"])


def test_cli_and_describe_take_onnx(tagger, tmp_path, capsys):
    """By name and by content (a cached download's name says nothing), in a folder, and
    ``--describe`` with the graph's kinds."""
    import json
    import shutil

    from allennlp_analyze.cli import main

    _, path = tagger
    shutil.copy(path, tmp_path / "blob")
    (tmp_path / "folder").mkdir()
    shutil.copy(path, tmp_path / "folder" / "model.onnx")
    expected = records(OnnxSource(path), include=())
    for spec in (path, tmp_path / "blob", tmp_path / "folder"):
        assert main([str(spec), "--min-q", "1", "--workers", "1", "--format", "json"]) == 0
        found = {r["name"]: r for r in json.loads(capsys.readouterr().out)["records"]}
        assert set(found) == set(expected) == {"fc.weight", "lstm.weight_ih_l0",
                                               "lstm.weight_hh_l0"}
        for name in found:
            same_record(found[name], expected[name], origin=True)
    assert main([str(path), "--describe"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert lines["fc.weight"][1:5] == ["7x10", "float32", "linear", "module"]
    assert lines["conv.weight"][1:5] == ["6x3x3x3", "float32", "conv", "module"]
    assert lines["lstm.weight_hh_l0"][1:5] == ["40x10", "float32", "recurrent", "module"]
    assert lines["emb.weight"][3] == "embedding"


def test_an_executor_run_equals_the_local_one(tagger):
    from concurrent.futures import ThreadPoolExecutor

    _, path = tagger
    local = analyze(str(path), **OPTS).to_dicts()
    with ThreadPoolExecutor(2) as pool:
        remote = analyze(str(path), executor=pool, **OPTS).to_dicts()
    assert len(local) == 4 + 9 + 4
    for a, b in zip(local, remote):
        assert a == b, {k: (a[k], b[k]) for k in a if a[k] != b[k]}
