"""``--describe`` / ``describe()``: every tensor listed with shape, dtype, kind and the analysis's
decision, from headers only: no tensor data read, no spectrum computed (both made to fail here)."""
import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from allennlp_analyze import analyze, cli, describe
from allennlp_analyze import matrix, spectrum
from allennlp_analyze.sources import safetensors_file

TAGGER = Path(__file__).resolve().parents[1] / "fixtures" / "archives" / "tagger_lstm.tar.gz"


@pytest.fixture
def nothing_computed(monkeypatch):
    """Every way to read a tensor's data or compute a spectrum raises."""
    def fail(*args, **kwargs):
        raise AssertionError("describe read tensor data or computed a spectrum")

    monkeypatch.setattr(safetensors_file, "read_tensor", fail)
    for cls in (safetensors_file.SafetensorsSource, safetensors_file.ShardedSafetensorsSource):
        monkeypatch.setattr(cls, "load", fail)
        monkeypatch.setattr(cls, "load_mapped", fail)
    from allennlp_analyze.sources._common import TensorDictSource

    monkeypatch.setattr(TensorDictSource, "load", fail)
    monkeypatch.setattr(matrix, "singular_values_many", fail)
    monkeypatch.setattr(spectrum, "singular_values_many", fail)
    monkeypatch.setattr(np.linalg, "svd", fail)
    monkeypatch.setattr(np.linalg, "eigvalsh", fail)


def test_minilm_lists_every_tensor_and_computes_nothing(minilm_path, nothing_computed):
    d = describe(minilm_path.parent, include=("embeddings",))
    with safe_open(str(minilm_path), framework="numpy") as f:
        reference = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                     for k in f.keys()}
    assert sorted(t.name for t in d.tensors) == sorted(reference)
    dtypes = {"F32": "float32", "I64": "int64"}
    for t in d.tensors:
        assert (t.shape, t.dtype) == (reference[t.name][0], dtypes[reference[t.name][1]])
    by_name = {t.name: t for t in d.tensors}
    ff = by_name["encoder.layer.0.intermediate.dense.weight"]
    assert (ff.kind, ff.kind_from, ff.decision) == ("linear", "structure", "analyzed as 1536 x 384")
    attn = by_name["encoder.layer.0.attention.self.query.weight"]
    assert attn.decision == "skipped: aspect ratio Q below --min-q 1.1" and attn.matrices == 0
    word = by_name["embeddings.word_embeddings.weight"]
    assert (word.kind, word.kind_from) == ("embedding", "config")  # config.json's vocab_size
    assert by_name["embeddings.position_ids"].decision == \
        "skipped: not a floating-point tensor (int64)"
    # the counts: by hand, 6 layers x 6 Linear + the pooler; 3 tables; 1 int64 buffer
    assert d.counts("kind") == {"vector": 63, "linear": 37, "embedding": 3, "non_float": 1}
    assert d.counts("kind_from") == {"structure": 101, "config": 3}
    assert d.matrices == 6 * 2 + 3


def test_describe_says_what_analyze_does(minilm_path):
    """The matrices described as analyzed are the records of the analysis, option for
    option."""
    for options in ({}, {"min_q": 1.0, "split_fused": True, "include": ("embeddings",)}):
        d = describe(minilm_path, **options)
        planned = sum(t.matrices for t in d.tensors)
        records = analyze(minilm_path, **options).records
        assert planned == len(records) == d.matrices
        analyzed = [t.name for t in d.tensors if t.matrices]
        assert sorted(analyzed) == sorted(r.name for r in records)


def test_parts_and_slices_are_described(nothing_computed):
    import torch.nn as nn

    net = nn.Sequential(nn.LSTM(16, 32), nn.Conv2d(60, 70, 3), nn.MultiheadAttention(48, 4))
    d = describe(net, split_fused=True, include=("conv",), min_q=1.0)
    by_name = {t.name: t for t in d.tensors}
    assert by_name["0.weight_ih_l0"].decision == "analyzed as 4 matrices of 32 x 16 [i, f, g, o]"
    assert by_name["0.weight_hh_l0"].decision == "analyzed as 4 matrices of 32 x 32 [i, f, g, o]"
    assert by_name["1.weight"].decision == "analyzed as 9 slices of 70 x 60 (kernel positions)"
    assert by_name["2.in_proj_weight"].decision == "analyzed as 3 matrices of 48 x 48 [q, k, v]"
    assert by_name["2.in_proj_weight"].kind_from == "module"
    d = describe(net, split_fused=True, include=("conv",))  # Q 1.1: the square parts go
    hh = {t.name: t for t in d.tensors}["0.weight_hh_l0"]
    assert hh.decision == "skipped: aspect ratio Q below --min-q 1.1 (4 parts)"


def test_command_line_table_and_json(minilm_path, nothing_computed, tmp_path, capsys):
    assert cli.main([str(minilm_path.parent), "--describe"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["name", "shape", "dtype", "kind", "from", "decision"]
    rows = [ln for ln in lines[2:] if ln and not ln.startswith(("Described", "  "))]
    assert len(rows) == 104
    assert any(ln.split()[:5] == ["encoder.layer.5.output.dense.weight", "384x1536", "float32",
                                  "linear", "structure"] and ln.endswith("analyzed as 384 x 1536")
               for ln in rows)
    assert "Described: 104 tensors in 1 model; 12 matrices would be analyzed" in out
    assert "tensors by kind_from: structure 101, config 3" in out

    path = tmp_path / "d.json"
    assert cli.main([str(minilm_path.parent), "--describe", "--format", "json", "-o", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert len(doc["tensors"]) == 104 and doc["summary"]["matrices"] == 12
    assert doc["summary"]["kind_from"] == dict(Counter(t["kind_from"] for t in doc["tensors"]))
    assert set(doc["tensors"][0]) == {"model", "name", "shape", "dtype", "module_type", "kind",
                                      "kind_from", "matrices", "skipped", "decision"}
    assert cli.main([str(minilm_path.parent), "--describe", "--plot-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_allennlp_analyze_describe_shows_module_types(nothing_computed, capsys):
    pytest.importorskip("allennlp")
    from allennlp_analyze.plugin.subcommand import Analyze

    parser = argparse.ArgumentParser(prog="allennlp")
    Analyze().add_subparser(parser.add_subparsers())
    args = parser.parse_args(["analyze", str(TAGGER), "--describe", "--format", "json"])
    with pytest.raises(SystemExit) as exc:
        args.func(args)
    assert exc.value.code == 0
    doc = json.loads(capsys.readouterr().out)
    kinds = {t["name"]: (t["module_type"], t["kind"], t["kind_from"]) for t in doc["tensors"]}
    assert kinds["encoder._module.weight_ih_l0"] == ("LSTM", "recurrent", "module")
    assert kinds["tag_projection_layer._module.weight"] == ("Linear", "linear", "module")
    assert kinds["text_field_embedder.token_embedder_tokens.weight"] == \
        ("Embedding", "embedding", "module")
    assert doc["summary"]["matrices"] == 5
