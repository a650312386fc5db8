"""Keras 3 sharded weights (``save_weights("m.weights.json", max_shard_size=...)``) written by
Keras 3 itself (torch backend), read by :mod:`allennlp_analyze.sources.keras_shards` as one
source: the same tensors (names, shapes, bits) as the single ``.weights.h5`` of the same model,
the same records, Keras's own ``layer.get_weights()`` values; by name, in a folder; each shard
alone as an ordinary ``.weights.h5``; and the one-line refusals of broken indexes."""
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import hostile_inputs as H

from allennlp_analyze import analyze
from allennlp_analyze.errors import AnalyzeError
from allennlp_analyze.sources import open_source, registry
from allennlp_analyze.sources.keras_file import KerasSource
from allennlp_analyze.sources.keras_shards import ShardedKerasSource

#: Options under which every kernel of the test model is analyzed.
ALL = dict(min_q=1.0, include=("conv", "embeddings"), conv_min_dim=1)
#: Largest shard, bytes: the model's 4,252 bytes of float32 variables land in 4 shards, the
#: LSTM cell's kernel in the first and its recurrent kernel and bias in the second.
SHARD_BYTES = 1200


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One model (LSTM, MultiHeadAttention, Conv2D, Dense) saved by ``save_weights`` whole
    (``whole/m.weights.h5``) and sharded (``sharded/m.weights.json``), each with the model's
    Keras ``config.json`` beside it; and Keras's own values of every variable by path."""
    os.environ["KERAS_BACKEND"] = "torch"
    os.environ.setdefault("KERAS_HOME", str(tmp_path_factory.mktemp("keras_home")))
    keras = pytest.importorskip("keras")
    assert keras.backend.backend() == "torch"
    keras.utils.set_random_seed(0)
    L = keras.layers
    seq, img = keras.Input((5, 6)), keras.Input((6, 6, 2))
    x = L.LSTM(8, return_sequences=True)(seq)
    x = L.GlobalAveragePooling1D()(L.MultiHeadAttention(num_heads=2, key_dim=4)(x, x))
    y = L.Flatten()(L.Conv2D(4, 3)(img))
    model = keras.Model([seq, img], L.Dense(3)(L.Concatenate()([x, y])))
    root = tmp_path_factory.mktemp("keras_shards")
    paths = {"whole": root / "whole" / "m.weights.h5", "sharded": root / "sharded" / "m.weights.json"}
    for path in paths.values():
        path.parent.mkdir()
        (path.parent / "config.json").write_text(model.to_json())
    model.save_weights(paths["whole"])
    model.save_weights(paths["sharded"], max_shard_size=SHARD_BYTES / 2**30)
    values = {v.path: w for layer in model.layers
              for v, w in zip(layer.weights, layer.get_weights())}
    return {**paths, "values": values, "classes": {l.name: type(l).__name__ for l in model.layers}}


def _weight_map(path: Path) -> dict:
    return json.loads(path.read_text())["weight_map"]


def test_keras_wrote_several_shards_and_split_a_layer(saved):
    """The fixture is what the tests need: >= 3 shards, a layer's variables in two of them."""
    weight_map = _weight_map(saved["sharded"])
    shards = {s for v in weight_map.values() for s in ([v] if isinstance(v, str) else v)}
    assert len(shards) >= 3 and all((saved["sharded"].parent / s).is_file() for s in shards)
    assert any(isinstance(v, list) and len(v) == 2 for v in weight_map.values())


def test_sharded_is_the_whole_file_bit_for_bit(saved):
    """Names, shapes, dtypes, kinds and every bit as the single .weights.h5; records equal."""
    whole, sharded = KerasSource(saved["whole"]), ShardedKerasSource(saved["sharded"])
    infos = [(t.name, t.shape, t.dtype, t.module_type, t.parts) for t in whole.tensors()]
    assert [(t.name, t.shape, t.dtype, t.module_type, t.parts) for t in sharded.tensors()] == infos
    assert len(infos) == 15
    for name, *_ in infos:
        a, b = whole.load(name), sharded.load(name)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name
    runs = [[{k: v for k, v in r.items() if k != "model"}
             for r in analyze(s, split_fused=True, **ALL).to_dicts()] for s in (whole, sharded)]
    assert runs[0] == runs[1] and len(runs[0]) >= 6


#: How each kernel is oriented (out x in, as PyTorch lays out the layer), from Keras's
#: documented layouts; biases as stored.
ORIENT = {
    "lstm/lstm_cell/kernel": lambda k: k.T,
    "lstm/lstm_cell/recurrent_kernel": lambda k: k.T,
    "conv2d/kernel": lambda k: k.transpose(3, 2, 0, 1),
    "dense/kernel": lambda k: k.T,
    **{f"multi_head_attention/{p}/kernel": lambda k: k.reshape(k.shape[0], -1).T
       for p in ("query", "key", "value")},
    "multi_head_attention/attention_output/kernel": lambda k: k.reshape(-1, k.shape[-1]).T,
}


def test_values_are_keras_own(saved):
    """Every tensor equals Keras's ``layer.get_weights()`` for that variable, oriented."""
    source = ShardedKerasSource(saved["sharded"])
    names = {t.name for t in source.tensors()}
    assert names == {p.replace("/", ".") for p in saved["values"]}
    for path, value in saved["values"].items():
        expected = ORIENT.get(path, lambda v: v)(value)
        assert np.array_equal(source.load(path.replace("/", ".")), expected), path


def test_by_name_in_a_folder_and_config_beside(saved, tmp_path):
    """Claimed by its name; a folder holding the index (and its shards, which the
    ``.weights.h5`` entry would match too) opens as the sharded source; the config beside
    it is read: a config contradicting the weights is refused."""
    index = saved["sharded"]
    assert registry.by_name(index).name == "sharded-keras"
    source = open_source(index.parent)
    assert isinstance(source, ShardedKerasSource) and source.label == "sharded"
    assert source.config["class_name"] == "Functional"
    kinds = {t.name.split(".")[0]: t.module_type for t in source.tensors()}
    assert kinds["conv2d"] == "Conv2D" and kinds["dense"] == "Dense"
    assert isinstance(open_source(str(index)), ShardedKerasSource)
    folder = tmp_path / "lying"
    shutil.copytree(index.parent, folder)
    config = json.loads((folder / "config.json").read_text())
    dense = next(l for l in config["config"]["layers"] if l["class_name"] == "Dense")
    dense["config"]["units"] = 5
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(AnalyzeError, match=r"has a kernel of shape 72x3, but its config says "
                                           r"units = 5: the config contradicts the weights"):
        ShardedKerasSource(folder / index.name)


def test_each_shard_alone_is_an_ordinary_weights_file(saved):
    """A shard alone reads as a .weights.h5: every variable it stores (h5py's arrays; names
    may differ from the whole model's, as an object whose own group is in another shard is
    then a container); one holding the later variables of a split object (not 0, 1, ...) is
    refused in one line, as before."""
    weight_map = _weight_map(saved["sharded"])
    split = {s for v in weight_map.values() if isinstance(v, list) and len(v) > 1 for s in v[1:]}
    read = 0
    for shard in sorted({s for v in weight_map.values() for s in v}):
        path = saved["sharded"].parent / shard
        if shard in split:
            with pytest.raises(AnalyzeError, match="holds something other than datasets 0, 1"):
                KerasSource(path)
            continue
        source = open_source(path)
        assert isinstance(source, KerasSource)
        with h5py.File(path, "r") as f:
            stored = [f[g][k][()] for g, v in weight_map.items() if shard in v for k in f[g]]
        loaded = [source.load(t.name) for t in source.tensors()]
        assert sorted(np.sort(a, axis=None).tobytes() for a in loaded) == \
            sorted(np.sort(a, axis=None).tobytes() for a in stored)
        read += 1
    assert read >= 2 and split


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    return H.keras_sharded_hostile(tmp_path_factory.mktemp("keras_sharded_hostile"))


@pytest.mark.parametrize("case, fragment", H.KERAS_SHARDED_CASES)
def test_hostile_indexes_are_one_line_errors(hostile, case, fragment):
    with pytest.raises(AnalyzeError) as e:
        ShardedKerasSource(hostile[case])
    message = str(e.value)
    assert "\n" not in message and str(hostile[case]) in message and fragment in message


def test_good_hostile_baseline_reads_across_its_shards(hostile):
    """The index the hostile cases are made from: the kernel from one shard, the bias from
    the other (h5py's own arrays)."""
    source = ShardedKerasSource(hostile["good"])
    assert [t.name for t in source.tensors()] == ["dense.kernel", "dense.bias"]
    folder = hostile["good"].parent
    with h5py.File(folder / "m_00000.weights.h5", "r") as a, \
            h5py.File(folder / "m_00001.weights.h5", "r") as b:
        assert np.array_equal(source.load("dense.kernel"), a["layers/dense/vars/0"][()].T)
        assert np.array_equal(source.load("dense.bias"), b["layers/dense/vars/1"][()])
