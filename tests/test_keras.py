"""Keras files (``.keras``, ``.weights.h5``, legacy ``.h5``) written by Keras 3 itself (torch
backend) and by h5py by hand, read by :mod:`allennlp_analyze.sources.keras_file`: records equal
numpy's SVD of h5py's own arrays (as the layer uses them: out x in), names are Keras's variable
paths, kinds those of the layer classes in the config, the same layer from PyTorch gives the same
record, and a ``Lambda`` layer in the file never runs."""
import json
import os
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest

import hostile_inputs as H
from conftest import assert_record_matches_reference

from allennlp_analyze import analyze, describe
from allennlp_analyze.errors import AnalyzeError
from allennlp_analyze.sources import open_source, registry
from allennlp_analyze.sources.keras_file import KerasSource

#: Options under which every kernel of the test models is analyzed.
ALL = dict(min_q=1.0, include=("conv", "embeddings"), conv_min_dim=1)
#: Kind of each layer class's kernel (the issue's list).
KERNEL_KIND = {"Dense": "linear", "Conv2D": "conv", "LSTM": "recurrent", "Embedding": "embedding",
               "MultiHeadAttention": "linear"}
MARKER_ENV = "ALLENNLP_ANALYZE_TEST_LAMBDA_MARKER"


@pytest.fixture(scope="module")
def keras(tmp_path_factory):
    os.environ["KERAS_BACKEND"] = "torch"
    os.environ.setdefault("KERAS_HOME", str(tmp_path_factory.mktemp("keras_home")))
    keras = pytest.importorskip("keras")
    assert keras.backend.backend() == "torch"
    keras.utils.set_random_seed(0)
    return keras


def _save(model, folder: Path, name: str) -> dict:
    """``name.keras``, ``name.weights.h5`` (alone in a folder of its own) and Keras's legacy
    ``name.h5``; with Keras's own variables by path (within the model)."""
    folder.mkdir()
    paths = {"keras": folder / f"{name}.keras", "weights": folder / "w" / f"{name}.weights.h5",
             "legacy": folder / f"{name}.h5"}
    paths["weights"].parent.mkdir()
    model.save(paths["keras"])
    model.save_weights(paths["weights"])
    model.save(paths["legacy"])
    # Keras's variable paths, less the model's own name (a Sequential's variables have it)
    return {**paths, "variables": {v.path.removeprefix(model.name + "/"): np.asarray(v.numpy())
                                   for v in model.weights}}


@pytest.fixture(scope="module")
def models(keras, tmp_path_factory):
    """Tiny Dense, Conv2D, LSTM, Embedding and MultiHeadAttention models, saved three ways."""
    root = tmp_path_factory.mktemp("keras_models")
    L = keras.layers
    built = {
        "dense": keras.Sequential([keras.Input((24,)), L.Dense(16, name="dense_1"),
                                   L.Dense(9, use_bias=False, name="out")]),
        "conv": keras.Sequential([keras.Input((8, 8, 5)), L.Conv2D(7, (3, 2), name="conv")]),
        "lstm": keras.Sequential([keras.Input((4, 12)), L.LSTM(6, name="lstm")]),
        "embedding": keras.Sequential([keras.Input((3,), dtype="int32"),
                                       L.Embedding(40, 8, name="embedding")]),
    }
    x = keras.Input((5, 16))
    built["mha"] = keras.Model(x, L.MultiHeadAttention(num_heads=2, key_dim=5, name="mha")(x, x))
    return {name: _save(model, root / name, name) for name, model in built.items()}


def _h5(path: Path, folder: Path) -> h5py.File:
    """A Keras file's HDF5 weights opened by h5py (a .keras file's member extracted first)."""
    if path.suffix == ".keras":
        with zipfile.ZipFile(path) as z:
            path = Path(z.extract("model.weights.h5", folder))
    return h5py.File(path, "r")


def _config(path: Path) -> dict:
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read("config.json"))


#: Where Keras 3 stores each kernel (h5 path), the Keras variable it is, and the matrix the
#: layer applies (written from Keras's documented layouts, not from the reader).
KERNELS = {
    "dense": [("layers/dense/vars/0", "dense_1/kernel", lambda k: k.T),
              ("layers/dense_1/vars/0", "out/kernel", lambda k: k.T)],
    "conv": [("layers/conv2d/vars/0", "conv/kernel", None)],
    "lstm": [("layers/lstm/cell/vars/0", "lstm/lstm_cell/kernel", None),
             ("layers/lstm/cell/vars/1", "lstm/lstm_cell/recurrent_kernel", None)],
    "embedding": [("layers/embedding/vars/0", "embedding/embeddings", lambda k: k)],
    "mha": [(f"layers/multi_head_attention/{key}/vars/0", f"mha/{name}/kernel",
             (lambda k: k.reshape(-1, k.shape[-1]).T) if name == "attention_output"
             else (lambda k: k.reshape(k.shape[0], -1).T))
            for key, name in (("query_dense", "query"), ("key_dense", "key"),
                              ("value_dense", "value"), ("output_dense", "attention_output"))],
}


def _references(model: str, kernel: np.ndarray, transform):
    """``{record slice: matrix}`` of one kernel: whole, per convolution position (out x in) or
    per LSTM gate in Keras's order i, f, c, o (``--split-fused``)."""
    if model == "conv":
        return {f"{i},{j}": kernel[i, j].T for i in range(kernel.shape[0])
                for j in range(kernel.shape[1])}
    if model == "lstm":
        h = kernel.shape[1] // 4
        return {g: kernel[:, n * h:(n + 1) * h].T for n, g in enumerate("ifco")}
    return {None: transform(kernel)}


@pytest.mark.parametrize("fmt", ["keras", "weights", "legacy"])
@pytest.mark.parametrize("model", list(KERNELS))
def test_records_equal_numpy_on_h5py_arrays(models, model, fmt, tmp_path):
    files = models[model]
    result = analyze(KerasSource(files[fmt]), split_fused=True, **ALL)
    records = {(r["name"].split("[")[0], r["slice"]): r for r in result.to_dicts()}
    expected = set()
    with _h5(files["keras"], tmp_path) as h5:
        for h5_path, keras_path, transform in KERNELS[model]:
            kernel = h5[h5_path][()]
            # the h5 dataset is the Keras variable of that path (names are Keras's)
            assert np.array_equal(kernel, files["variables"][keras_path])
            name = keras_path.replace("/", ".")
            for part, W in _references(model, kernel, transform).items():
                assert_record_matches_reference(records[(name, part)], W)
                expected.add((name, part))
    assert set(records) == expected


@pytest.mark.parametrize("model", list(KERNELS))
def test_kinds_and_module_types_as_the_config_says(models, model):
    files = models[model]
    classes = {layer["config"]["name"]: layer["class_name"]
               for layer in _config(files["keras"])["config"]["layers"]}
    for fmt in ("keras", "weights", "legacy"):  # .weights.h5 alone: the classes from its keys
        tensors = describe(KerasSource(files[fmt]), **ALL).tensors
        assert tensors, fmt
        for t in tensors:
            cls = classes[t.name.split(".")[0]]
            param = t.name.rpartition(".")[2]
            if param.endswith("kernel") or param == "embeddings":
                assert t.kind == KERNEL_KIND[cls], (fmt, t)
                assert t.module_type == ("EinsumDense" if cls == "MultiHeadAttention" else cls)
                assert t.kind_from == "module" and t.matrices >= 1
            else:
                assert param == "bias" and t.kind == "vector" and t.matrices == 0, (fmt, t)


def test_three_files_of_one_model_give_the_same_records(models):
    for files in models.values():
        runs = [analyze(KerasSource(files[fmt]), split_fused=True, **ALL).to_dicts()
                for fmt in ("keras", "weights", "legacy")]
        for run in runs:
            for r in run:
                r.pop("model")
        by_name = [sorted(run, key=lambda r: (r["name"], r["slice"] or "")) for run in runs]
        assert by_name[0] == by_name[1] == by_name[2]


def test_same_layer_from_pytorch_gives_the_same_record(models):
    """The Keras kernels as PyTorch's Linear / Conv2d / LSTM / MultiheadAttention-style linear
    weights in a state dict: the same records (but for the name and module type)."""
    torch = pytest.importorskip("torch")
    v = {name: models[m]["variables"][name] for m in models for name in models[m]["variables"]}
    state = {
        "fc.weight": v["dense_1/kernel"].T, "fc.bias": v["dense_1/bias"],
        "conv.weight": v["conv/kernel"].transpose(3, 2, 0, 1), "conv.bias": v["conv/bias"],
        "rnn.weight_ih_l0": v["lstm/lstm_cell/kernel"].T,
        "rnn.weight_hh_l0": v["lstm/lstm_cell/recurrent_kernel"].T,
        "q_proj.weight": v["mha/query/kernel"].reshape(16, 10).T,
    }
    state = {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in state.items()}
    ours = {r["name"]: r for r in analyze(open_source(state), split_fused=True, **ALL).to_dicts()}
    keras_records = {}
    for m in ("dense", "conv", "lstm", "mha"):
        for r in analyze(KerasSource(models[m]["keras"]), split_fused=True, **ALL).to_dicts():
            keras_records[r["name"]] = r
    pairs = {"fc.weight": "dense_1.kernel", "q_proj.weight": "mha.query.kernel",
             **{f"conv.weight[{i},{j}]": f"conv.kernel[{i},{j}]"
                for i in range(3) for j in range(2)},
             **{f"rnn.weight_ih_l0[{t}]": f"lstm.lstm_cell.kernel[{k}]"
                for t, k in zip("ifgo", "ifco")},
             **{f"rnn.weight_hh_l0[{t}]": f"lstm.lstm_cell.recurrent_kernel[{k}]"
                for t, k in zip("ifgo", "ifco")}}
    for torch_name, keras_name in pairs.items():
        a, b = dict(ours[torch_name]), dict(keras_records[keras_name])
        for r in (a, b):
            for key in ("model", "name", "module_type", "kind_from", "slice"):
                r.pop(key)
        if a["kind"] == "matrix":  # a bare q_proj: the name says nothing more
            a["kind"] = "linear"
        assert a == b, torch_name


def _legacy_file(path: Path, weights_only: bool) -> dict:
    """A Keras 2 style ``.h5`` built with h5py: Dense ``dense_1`` (10 -> 7) and LSTM ``lstm``
    (7 -> 3 units, weights ``lstm/lstm_cell/...:0``), as ``model.save`` (``model_config``,
    ``model_weights``) or ``save_weights`` (``layer_names`` at the root) wrote them."""
    rng = np.random.default_rng(7)
    arrays = {"dense_1/kernel:0": rng.standard_normal((10, 7)).astype("f4"),
              "dense_1/bias:0": rng.standard_normal(7).astype("f4"),
              "lstm/lstm_cell/kernel:0": rng.standard_normal((7, 12)).astype("f4"),
              "lstm/lstm_cell/recurrent_kernel:0": rng.standard_normal((3, 12)).astype("f4"),
              "lstm/lstm_cell/bias:0": rng.standard_normal(12).astype("f4")}
    config = {"class_name": "Sequential", "config": {"name": "sequential", "layers": [
        {"class_name": "Dense", "config": {"name": "dense_1", "units": 7}},
        {"class_name": "LSTM", "config": {"name": "lstm", "units": 3}}]}}
    with h5py.File(path, "w") as f:
        if weights_only:
            group = f
        else:
            f.attrs["model_config"] = json.dumps(config).encode()
            group = f.create_group("model_weights")
        f.attrs["keras_version"] = b"2.13.1"
        group.attrs["layer_names"] = np.array([b"dense_1", b"lstm"])
        for layer in ("dense_1", "lstm"):
            names = [n for n in arrays if n.startswith(layer + "/")]
            g = group.create_group(layer)
            g.attrs["weight_names"] = np.array([n.encode() for n in names])
            for n in names:
                g[n] = arrays[n]
    return arrays


@pytest.mark.parametrize("weights_only", [False, True])
def test_legacy_h5_built_by_hand(tmp_path, weights_only):
    path = tmp_path / "legacy.h5"
    arrays = _legacy_file(path, weights_only)
    source = KerasSource(path)
    assert [t.name for t in source.tensors()] == [n[:-2].replace("/", ".") for n in arrays]
    records = {r["name"]: r for r in analyze(source, split_fused=True, **ALL).to_dicts()}
    with h5py.File(path, "r") as f:
        group = f if weights_only else f["model_weights"]
        kernel = group["dense_1/dense_1/kernel:0"][()]
        assert_record_matches_reference(records["dense_1.kernel"], kernel.T)
        for name in ("kernel", "recurrent_kernel"):
            k = group[f"lstm/lstm/lstm_cell/{name}:0"][()]
            for n, gate in enumerate("ifco"):
                assert_record_matches_reference(records[f"lstm.lstm_cell.{name}[{gate}]"],
                                                k[:, 3 * n:3 * n + 3].T)
    # without a config (weights_only), the names Keras gave the layers say their classes
    kinds = {t.name: (t.kind, t.module_type) for t in describe(source, **ALL).tensors}
    assert kinds["dense_1.kernel"] == ("linear", "Dense")
    assert kinds["lstm.lstm_cell.kernel"] == ("recurrent", "LSTM")
    assert len(records) == 1 + 2 * 4


def test_legacy_h5_of_unknown_layers_falls_back_to_structure(tmp_path):
    """A layer named by its user (``head``) in a file without a config: its class is unknown,
    its kernel is read as stored (in x out) and is a plain matrix."""
    kernel = np.random.default_rng(3).standard_normal((12, 5)).astype("f4")
    with h5py.File(tmp_path / "w.h5", "w") as f:
        f.attrs["layer_names"] = np.array([b"head"])
        g = f.create_group("head")
        g.attrs["weight_names"] = np.array([b"head/kernel:0"])
        g["head/kernel:0"] = kernel
    source = KerasSource(tmp_path / "w.h5")
    (t,) = describe(source, **ALL).tensors
    assert (t.name, t.kind, t.kind_from, t.module_type) == \
        ("head.kernel", "matrix", "default", None)
    (record,) = analyze(source, **ALL).to_dicts()
    assert_record_matches_reference(record, kernel)


def test_lambda_layer_never_runs(keras, tmp_path, monkeypatch):
    """A model whose Lambda writes a marker when called: analyzing and describing the file does
    not call it; Keras's own loader, told to trust the file, does (the control)."""
    L = keras.layers
    x = keras.Input((12,))
    # a Python lambda: Keras stores its bytecode in the file; called with the marker's path in
    # the environment, it creates that file
    body = lambda t: (__import__("os").environ.get("ALLENNLP_ANALYZE_TEST_LAMBDA_MARKER")  # noqa
                      and open(__import__("os").environ["ALLENNLP_ANALYZE_TEST_LAMBDA_MARKER"],
                               "w").close(), t * 2.0)[1]
    model = keras.Model(x, L.Lambda(body, name="lam")(L.Dense(6, name="d")(x)))
    path = tmp_path / "lambda.keras"
    model.save(path)
    assert any(layer["class_name"] == "Lambda" for layer in _config(path)["config"]["layers"])
    marker = tmp_path / "ran"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    result = analyze(KerasSource(path), **ALL)
    assert [r["name"] for r in result.to_dicts()] == ["d.kernel"]
    describe(KerasSource(path), **ALL)
    assert not marker.exists()
    loaded = keras.saving.load_model(path, safe_mode=False)  # the control: Keras runs it
    loaded(np.zeros((1, 12), "f4"))
    assert marker.exists()


def test_source_is_taken_by_the_api(models):
    source = KerasSource(models["dense"]["keras"])
    assert open_source(source) is source
    assert source.label == "dense.keras" and source.config["class_name"] == "Sequential"
    kernel = source.load("dense_1.kernel")
    assert kernel.shape == (16, 24) and kernel.flags.writeable


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    return H.keras_hostile(tmp_path_factory.mktemp("keras_hostile"))


@pytest.mark.parametrize("case, fragment", H.KERAS_CASES)
def test_hostile_keras_files_are_one_line_errors(hostile, case, fragment):
    with pytest.raises(AnalyzeError) as e:
        KerasSource(hostile[case])
    message = str(e.value)
    assert "\n" not in message and str(hostile[case]) in message and fragment in message


def test_good_hostile_baseline_reads(hostile):
    """The file the hostile cases are made from reads: the refusals are the cases' own."""
    source = KerasSource(hostile["good"])
    assert [t.name for t in source.tensors()] == ["dense.kernel", "dense.bias"]
    with h5py.File(hostile["good"], "r") as f:
        assert np.array_equal(source.load("dense.kernel"), f["layers/dense/vars/0"][()].T)


def test_bfloat16_and_float16_kernels(keras, tmp_path):
    """Keras stores a bfloat16 variable as an opaque 2-byte HDF5 type (attribute ``dtype``):
    read as bfloat16 (its values widened exactly, as Keras's own float32 cast gives them), a
    float16 one as float16; their records carry the storage dtype."""
    L = keras.layers
    for dtype in ("bfloat16", "float16"):
        model = keras.Sequential([keras.Input((24,)), L.Dense(10, dtype=dtype, name="d")])
        path = tmp_path / f"{dtype}.keras"
        model.save(path)
        kernel = np.asarray(keras.ops.convert_to_numpy(
            keras.ops.cast(model.layers[0].kernel, "float32")))
        source = KerasSource(path)
        assert [(t.name, t.dtype) for t in source.tensors()][0] == ("d.kernel", dtype)
        assert np.array_equal(source.load("d.kernel"), kernel.T)
        (record,) = analyze(source, **ALL).to_dicts()
        sv = np.linalg.svd(kernel.astype(np.float64), compute_uv=False)
        assert record["dtype"] == dtype and record["shape"] == [10, 24]
        assert record["sv_max"] == pytest.approx(sv[0], rel=1e-12)
        assert record["sv_min"] == pytest.approx(sv[-1], rel=1e-9)


def _rewrite_config(path: Path, out: Path, edit) -> Path:
    """A copy of a .keras file with ``edit(config)`` applied to its config.json."""
    with zipfile.ZipFile(path) as z, zipfile.ZipFile(out, "w") as w:
        for info in z.infolist():
            data = z.read(info)
            if info.filename == "config.json":
                config = json.loads(data)
                edit(config)
                data = json.dumps(config).encode()
            w.writestr(info, data)
    return out


def test_config_contradicting_the_attention_heads_is_refused(models, tmp_path):
    def heads(config):
        config["config"]["layers"][1]["config"]["num_heads"] = 3
    path = _rewrite_config(models["mha"]["keras"], tmp_path / "heads.keras", heads)
    with pytest.raises(AnalyzeError, match=r"layer '(query|key|value|attention_output)' "
                                           r"\(EinsumDense\) has a kernel of shape \S+, but its "
                                           r"config says num_heads = 3"):
        KerasSource(path)


def test_user_layers_named_like_keras_parts(keras, tmp_path):
    """A user's Dense named ``query`` beside an attention layer (whose own part is named
    ``query`` too): each keeps its class."""
    L = keras.layers
    x = keras.Input((5, 16))
    y = L.MultiHeadAttention(num_heads=2, key_dim=4, name="mha")(x, x)
    model = keras.Model(x, L.Dense(3, name="query")(y))
    model.save(tmp_path / "m.keras")
    kinds = {t.name: t.module_type for t in KerasSource(tmp_path / "m.keras").tensors()}
    assert kinds["query.kernel"] == "Dense" and kinds["mha.query.kernel"] == "EinsumDense"


def test_reading_imports_neither_keras_nor_torch(models):
    code = ("import sys; from allennlp_analyze import analyze; "
            "from allennlp_analyze.sources.keras_file import KerasSource; "
            f"r = analyze(KerasSource({str(models['lstm']['keras'])!r}), min_q=1.0); "
            "assert r.records; print(sorted(m for m in ('keras', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_optimizer_state_left_out_and_compressed_member_read(keras, tmp_path):
    """A trained model's file holds Adam's moments (kernel-shaped) under ``optimizer``: not
    weights of the model. The same file with its members deflated (Keras stores them) gives
    the same records."""
    L = keras.layers
    model = keras.Sequential([keras.Input((12,)), L.Dense(5, name="d")])
    model.compile("adam", "mse")
    model.fit(np.ones((8, 12), "f4"), np.ones((8, 5), "f4"), verbose=0)
    path = tmp_path / "fit.keras"
    model.save(path)
    with _h5(path, tmp_path) as h5:
        assert h5["optimizer/vars/2"].shape == (12, 5)  # a moment of the kernel
    with zipfile.ZipFile(path) as z:
        deflated = tmp_path / "deflated.keras"
        with zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as w:
            for info in z.infolist():
                w.writestr(info.filename, z.read(info))
    assert [t.name for t in KerasSource(path).tensors()] == ["d.kernel", "d.bias"]
    records = [analyze(KerasSource(p), **ALL).to_dicts() for p in (path, deflated)]
    for run in records:
        for r in run:
            r.pop("model")
    assert records[0] == records[1] and len(records[0]) == 1
    assert_record_matches_reference(records[0][0], model.layers[0].kernel.numpy().T)


# -- through the registry: by name, by content, in a folder; the CLI, --describe, executors ----

def _records(result_dicts):
    return [{k: v for k, v in r.items() if k != "model"} for r in result_dicts]


def test_opened_by_name_by_content_and_in_a_folder(models, tmp_path):
    files = models["lstm"]
    reference = _records(analyze(KerasSource(files["keras"]), **ALL).to_dicts())
    for fmt in ("keras", "weights", "legacy"):
        path = files[fmt]
        assert registry.by_name(path).name == "keras"
        assert registry.by_content(path, registry.read_head(path)).name == "keras"
        blob = tmp_path / f"blob-{fmt}"
        blob.write_bytes(path.read_bytes())
        for spec in (path, blob, str(path)):
            source = open_source(spec)
            assert isinstance(source, KerasSource), (fmt, spec)
            assert _records(analyze(source, **ALL).to_dicts()) == reference
    # a .keras file unzipped: its config.json beside model.weights.h5 names the classes
    folder = tmp_path / "unzipped"
    with zipfile.ZipFile(files["keras"]) as z:
        z.extractall(folder)
    source = open_source(folder)
    assert isinstance(source, KerasSource) and source.config["class_name"] == "Sequential"
    assert _records(analyze(source, **ALL).to_dicts()) == reference
    # an .h5 file that is not HDF5 is left to the other formats (none claims it)
    (tmp_path / "notes.h5").write_text("not HDF5")
    assert registry.by_name(tmp_path / "notes.h5") is None
    with pytest.raises(AnalyzeError, match="is not a recognised weights file"):
        open_source(tmp_path / "notes.h5")


def test_cli_and_describe(models, capsys):
    from allennlp_analyze import cli

    path = models["conv"]["keras"]
    expected = _records(analyze(KerasSource(path), **ALL).to_dicts())
    assert cli.main([str(path), "--format", "json", "--min-q", "1", "--include", "conv",
                     "--conv-min-dim", "1"]) in (0, None)
    doc = json.loads(capsys.readouterr().out)
    assert _records(doc["records"]) == expected
    assert cli.main([str(path), "--describe", "--format", "json", "--include", "conv",
                     "--conv-min-dim", "1", "--min-q", "1"]) in (0, None)
    described = json.loads(capsys.readouterr().out)
    rows = {t["name"]: t for t in described["tensors"]}
    assert rows["conv.kernel"]["kind"] == "conv" and rows["conv.kernel"]["shape"] == [7, 5, 3, 2]
    assert rows["conv.kernel"]["matrices"] == 6 and rows["conv.bias"]["kind"] == "vector"


def test_executor_run_equals_the_local_run(models):
    paths = [str(models[m]["keras"]) for m in ("dense", "mha")]
    local = analyze(*paths, **ALL).to_dicts()
    with ThreadPoolExecutor(1) as pool:
        assert analyze(*paths, executor=pool, **ALL).to_dicts() == local


def test_without_h5py_a_keras_file_is_one_line(models):
    """h5py is the optional ``[keras]`` extra: without it, a Keras file is one line naming it
    (and other formats still open: it is imported only when a Keras file is read)."""
    code = ("import sys; sys.modules['h5py'] = None; from allennlp_analyze import cli; "
            f"sys.exit(cli.main([{str(models['dense']['keras'])!r}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == ("allennlp-analyze: error: reading Keras files needs h5py "
                          "(pip install 'allennlp-analyze[keras]')\n")


def test_more_layer_classes(keras, tmp_path):
    """Conv1D (a 3-D kernel: not GPT-2's Conv1D), GRU (gates z, r, h), a Bidirectional
    SimpleRNN and an EinsumDense whose kernel lists its output axis first ("ab,cb->ac"):
    kinds from the classes, each matrix as the layer applies it, against h5py's arrays."""
    L = keras.layers
    x = keras.Input((6, 10))
    y = L.Conv1D(8, 3, name="c1")(x)
    y = L.GRU(5, return_sequences=True, name="gru")(y)
    y = L.Bidirectional(L.SimpleRNN(4), name="bi")(y)
    y = L.EinsumDense("ab,cb->ac", output_shape=7, name="ein")(y)
    path = tmp_path / "more.keras"
    keras.Model(x, y).save(path)
    source = KerasSource(path)
    kinds = {t.name: (t.kind, t.module_type, t.matrices)
             for t in describe(source, split_fused=True, **ALL).tensors}
    assert kinds["c1.kernel"] == ("conv", "Conv1D", 3)
    assert kinds["gru.gru_cell.kernel"] == ("recurrent", "GRU", 3)
    assert kinds["gru.gru_cell.bias"][0] == "vector"  # 2 x 15: input and recurrent biases
    assert kinds["bi.forward_simple_rnn.simple_rnn_cell.recurrent_kernel"] == \
        ("recurrent", "SimpleRNN", 1)
    assert kinds["ein.kernel"] == ("linear", "EinsumDense", 1)
    records = {r["name"]: r for r in analyze(source, split_fused=True, **ALL).to_dicts()}
    with _h5(path, tmp_path) as h5:
        conv = h5["layers/conv1d/vars/0"][()]  # (3, 10, 8): k, in, out
        for k in range(3):
            assert_record_matches_reference(records[f"c1.kernel[{k}]"], conv[k].T)
        gru = h5["layers/gru/cell/vars/0"][()]  # (8, 15): in, (z, r, h) x 5
        for n, gate in enumerate("zrh"):
            assert_record_matches_reference(records[f"gru.gru_cell.kernel[{gate}]"],
                                            gru[:, 5 * n:5 * n + 5].T)
        rnn = h5["layers/bidirectional/backward_layer/cell/vars/0"][()]  # (5, 4)
        assert_record_matches_reference(records["bi.backward_simple_rnn.simple_rnn_cell.kernel"],
                                        rnn.T)
        ein = h5["layers/einsum_dense/vars/0"][()]  # "cb": (7, 8), out x in already
        assert ein.shape == (7, 8)
        assert_record_matches_reference(records["ein.kernel"], ein)


def test_files_without_object_names(models, tmp_path):
    """Keras 3 versions before the ``name`` attribute of each ``vars`` group: a layer is the
    config's layer that Keras keys so (``dense_1`` is the second Dense: here the user's
    ``out``), names and records as with the attribute; without a config, the keys name them."""
    files = models["dense"]
    folder = tmp_path / "unnamed"
    with zipfile.ZipFile(files["keras"]) as z:
        z.extractall(folder)
    with h5py.File(folder / "model.weights.h5", "r+") as f:
        groups: list = []
        f.visit(groups.append)
        for name in groups:
            if name.endswith("vars"):
                f[name].attrs.pop("name", None)
        assert not any("name" in f[n].attrs for n in ("layers/dense/vars", "layers/dense_1/vars"))
    with_names = _records(analyze(KerasSource(files["keras"]), **ALL).to_dicts())
    assert _records(analyze(open_source(folder), **ALL).to_dicts()) == with_names
    (folder / "config.json").unlink()
    names = [t.name for t in KerasSource(folder / "model.weights.h5").tensors()]
    assert names == ["dense.kernel", "dense.bias", "dense_1.kernel"]


def test_nested_model(keras, tmp_path):
    """A Sequential inside a Functional model: named by Keras's paths (``inner/d/kernel``),
    the same records from the three files, kinds from the nested model's classes."""
    L = keras.layers
    inner = keras.Sequential([keras.Input((8,)), L.Dense(6, name="d")], name="inner")
    x = keras.Input((8,))
    model = keras.Model(x, L.Dense(3, name="head")(inner(x)), name="outer")
    files = _save(model, tmp_path / "nested", "nested")
    runs = []
    for fmt in ("keras", "weights", "legacy"):
        source = KerasSource(files[fmt])
        assert {t.name: t.module_type for t in source.tensors() if t.name.endswith("kernel")} \
            == {"inner.d.kernel": "Dense", "head.kernel": "Dense"}, fmt
        runs.append(sorted(_records(analyze(source, **ALL).to_dicts()), key=lambda r: r["name"]))
    assert runs[0] == runs[1] == runs[2]
    for r in runs[0]:
        assert_record_matches_reference(r, files["variables"][r["name"].replace(".", "/")].T)
