"""The source registry: each format's file, written by its own library, is recognized by name and
by content alike; a format added as one entry is opened by path, by content, in a folder, and
counts for hub ids and hub downloads with no other change."""
import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from allennlp_analyze import AnalyzeError
from allennlp_analyze.sources import TensorDictSource, open_source, registry
from allennlp_analyze.sources.hub import parse_hub_id, weight_files


@pytest.fixture(scope="module")
def library_files(tmp_path_factory):
    """One file per format, written by the format's own library: {format name: path}."""
    torch = pytest.importorskip("torch")
    from safetensors.numpy import save_file

    d = tmp_path_factory.mktemp("formats")
    W = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.save(d / "w.npy", W)
    np.savez(d / "w.npz", w=W)
    save_file({"w": W}, str(d / "w.safetensors"))
    torch.save({"w": torch.from_numpy(W)}, d / "w.pt")
    torch.save({"w": torch.from_numpy(W)}, d / "legacy.th", _use_new_zipfile_serialization=False)
    data = io.BytesIO()
    torch.save({"w": torch.from_numpy(W)}, data)
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as t:
        info = tarfile.TarInfo("weights.th")
        info.size = len(data.getvalue())
        t.addfile(info, io.BytesIO(data.getvalue()))
    (d / "model.tar.gz").write_bytes(gzip.compress(tar.getvalue()))
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(d / "w.gguf"), "llama")
    writer.add_tensor("w", W)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(W, "w")])
    onnx.save_model(helper.make_model(graph), d / "w.onnx")
    return {"npy": d / "w.npy", "npz": d / "w.npz", "safetensors": d / "w.safetensors",
            "torch": d / "w.pt", "torch-legacy": d / "legacy.th", "archive": d / "model.tar.gz",
            "gguf": d / "w.gguf", "onnx": d / "w.onnx"}


def test_every_sniffable_format_is_recognized_by_content_as_by_name(library_files):
    sniffable = {f.name for f in registry.FORMATS if f.sniff is not None and f.readable}
    assert sniffable == {"npy", "npz", "safetensors", "torch", "archive", "keras", "gguf",
                         "onnx"}
    for key, path in library_files.items():
        fmt = registry.by_name(path)
        assert fmt is not None and fmt.name == key.split("-")[0], key
        assert registry.by_content(path, registry.read_head(path)) is fmt, key
        blob = path.with_name(f"blob-{key}")
        blob.write_bytes(path.read_bytes())
        assert type(open_source(blob)) is type(open_source(path)), key


def _read_wtxt(path: Path, label):
    """A toy format: a line ``WTXT``, then rows of numbers (one 2-D tensor ``w``)."""
    text = path.read_text()
    if not text.startswith("WTXT\n"):
        raise AnalyzeError(f"{path} is not a WTXT file")
    return TensorDictSource(label or path.name, {"w": np.loadtxt(io.StringIO(text[5:]), ndmin=2)})


@pytest.fixture
def wtxt_registered(monkeypatch):
    fmt = registry.SourceFormat("wtxt", (".wtxt",),
                                lambda path, label, key: _read_wtxt(path, label),
                                sniff=lambda path, head: head[:5] == b"WTXT\n",
                                folder_globs=("*.wtxt",), expected="a WTXT text file")
    monkeypatch.setattr(registry, "FORMATS", registry.FORMATS + [fmt])
    return fmt


def test_a_format_added_as_one_entry_is_opened_everywhere(tmp_path, wtxt_registered):
    W = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 7.0]])
    text = "WTXT\n1.0 2.0 3.0\n4.0 5.0 7.0\n"
    (tmp_path / "folder").mkdir()
    for path in (tmp_path / "m.wtxt", tmp_path / "blob", tmp_path / "folder" / "x.wtxt"):
        path.write_text(text)
    for spec in (tmp_path / "m.wtxt", tmp_path / "blob", tmp_path / "folder"):
        source = open_source(spec)
        assert [t.name for t in source.tensors()] == ["w"]
        np.testing.assert_array_equal(source.load("w"), W)
    assert parse_hub_id("org/model.wtxt") is None  # a file name, not a hub id
    assert parse_hub_id("org/model") == ("org/model", None)
    assert weight_files(["config.json", "README.md", "x.wtxt"]) == ["config.json", "x.wtxt"]
    (tmp_path / "other").write_bytes(b"\x00" * 32)
    with pytest.raises(AnalyzeError, match=r"not a recognised weights file \(expected .*, "
                                           r"a WTXT text file, or a model folder\)"):
        open_source(tmp_path / "other")
    (tmp_path / "folder" / "y.wtxt").write_text(text)
    with pytest.raises(AnalyzeError, match="several weight files"):
        open_source(tmp_path / "folder")
