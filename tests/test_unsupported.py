"""Formats that are recognised but not read (TFLite, TensorFlow SavedModel, Core ML): the command
line names each in one stderr line with what to convert it to, exit code 2; never "not a
recognised weights file" or "not a valid PyTorch file" (what a TFLite file saved as .bin got
before). GGUF, ONNX and Keras files, which were refused here, have readers (their tests)."""
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from allennlp_analyze import cli
from allennlp_analyze.sources import registry
from allennlp_analyze.sources.unsupported import UNSUPPORTED

REPO = Path(__file__).resolve().parents[1]
#: The head of a TFLite flatbuffer: root table offset, then the file identifier "TFL3".
TFLITE = struct.pack("<I", 28) + b"TFL3" + bytes(24)
FORMATS = {e.key for e in UNSUPPORTED}


def _folder(path: Path, files: dict) -> Path:
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def _cases(d: Path):
    """(key, path, what the line says it is)."""
    return [
        ("tflite", _folder(d / "a", {"model.tflite": TFLITE}) / "model.tflite",
         "a TensorFlow Lite model"),
        ("tflite", _folder(d / "b", {"model.bin": TFLITE}) / "model.bin",  # by content
         "a TensorFlow Lite model"),
        ("tflite", _folder(d / "c", {"downloaded": TFLITE}) / "downloaded",
         "a TensorFlow Lite model"),
        ("saved_model", _folder(d / "sm", {"saved_model.pb": b"\x08\x01",
                                           "variables/variables.index": b"\0"}),
         "a TensorFlow SavedModel"),
        ("coreml", _folder(d / "cm", {"model.mlmodel": b"\x08\x04"}) / "model.mlmodel",
         "a Core ML model"),
        ("coreml", _folder(d / "pkg" / "M.mlpackage", {
            "Manifest.json": b"{}", "Data/com.apple.CoreML/model.mlmodel": b"\x08\x04"}),
         "a Core ML model"),
    ]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return _cases(tmp_path_factory.mktemp("unsupported"))


def test_every_format_is_covered(cases):
    assert {key for key, _, _ in cases} == FORMATS


@pytest.mark.parametrize("k", range(6))
def test_one_line_exit_2_with_what_to_convert_to(cases, k, capsys):
    key, path, what = cases[k]
    rc = cli.main([str(path)])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert what in lines[0] and "does not read" in lines[0]
    entry = next(e for e in UNSUPPORTED if e.key == key)
    assert entry.advice in lines[0]
    for never in ("not a recognised", "not a checkpoint", "not a valid PyTorch", "holds no model"):
        assert never not in lines[0]


def test_through_the_installed_command(cases):
    """The same line from ``python -m allennlp_analyze`` (a subprocess, as a user runs it)."""
    _, path, what = cases[0]
    p = subprocess.run([sys.executable, "-m", "allennlp_analyze", str(path), "--describe"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and f"{path} is {what}" in p.stderr, p.stderr


def test_readable_files_are_not_taken_for_them(tmp_path):
    """A torch file, safetensors and a model folder still open: the content test looks only
    for the other formats' magic numbers."""
    import numpy as np
    import torch
    from safetensors.numpy import save_file

    from allennlp_analyze.sources import open_source

    torch.save({"fc.weight": torch.ones(3, 2)}, tmp_path / "pytorch_model.bin")
    save_file({"fc.weight": np.ones((3, 2), np.float32)}, str(tmp_path / "m.safetensors"))
    for path in (tmp_path / "pytorch_model.bin", tmp_path / "m.safetensors", tmp_path):
        assert [t.name for t in open_source(path).tensors()] == ["fc.weight"]


def test_registry_entries_come_last_and_once(tmp_path):
    """Each format that is not read has one registry entry, after every readable one (a folder
    holding a readable file and a .tflite is read), never fetched from the hub."""
    from allennlp_analyze.sources import open_source
    from allennlp_analyze.sources.hub import refused_listing, weight_files

    names = [f.name for f in registry.FORMATS]
    assert len(names) == len(set(names))  # a format with a reader has left UNSUPPORTED
    assert [f.name for f in registry.FORMATS if not f.readable] == [e.key for e in UNSUPPORTED]
    readable = [f.readable for f in registry.FORMATS]
    assert readable == sorted(readable, reverse=True)
    np = pytest.importorskip("numpy")
    np.save(tmp_path / "w.npy", np.ones((3, 2)))
    (tmp_path / "model.tflite").write_bytes(TFLITE)
    assert [t.name for t in open_source(tmp_path).tensors()] == ["w"]
    assert weight_files(["model.tflite", "README.md"]) == []
    assert refused_listing(["model.tflite", "README.md"]).key == "tflite"
    assert weight_files(["model.safetensors", "model.tflite"]) == ["model.safetensors"]
