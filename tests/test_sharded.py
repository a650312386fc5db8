"""Sharded safetensors: a checkpoint split over several shards (with its index, made here) gives
the same records as the single file; either way every analyzed tensor is read once, by itself
(no whole-file reads, nothing else read), and the command never imports torch."""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from allennlp_analyze import analyze
from allennlp_analyze.sources import safetensors_file

ROOT = Path(__file__).resolve().parents[1]


def write_safetensors(path: Path, tensors: dict) -> None:
    """A safetensors file (the format needs no library): header JSON, then the raw data."""
    header, chunks, offset = {"__metadata__": {"format": "np"}}, [], 0
    for name, value in tensors.items():
        if isinstance(value, tuple):  # ("BF16", uint16 bits)
            dtype, raw = value
        else:
            dtype = {"float32": "F32", "float64": "F64", "float16": "F16"}[value.dtype.name]
            raw = value
        data = np.ascontiguousarray(raw).tobytes()
        header[name] = {"dtype": dtype, "shape": list(raw.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + b"".join(chunks))


def make_weights(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    w = {}
    for i in range(3):
        w[f"encoder.layer.{i}.intermediate.dense.weight"] = \
            (rng.standard_normal((256, 64)) * 0.05).astype(np.float32)
        w[f"encoder.layer.{i}.intermediate.dense.bias"] = np.zeros(256, np.float32)
        w[f"encoder.layer.{i}.output.dense.weight"] = \
            (rng.standard_normal((64, 256)) * 0.05).astype(np.float32)
        w[f"encoder.layer.{i}.attention.self.query.weight"] = \
            rng.standard_normal((64, 64)).astype(np.float32)
    low_rank = rng.standard_normal((300, 10)) @ rng.standard_normal((10, 80))
    w["head.collapsed.weight"] = low_rank.astype(np.float64)
    bits = (rng.standard_normal((128, 48)).astype(np.float32).view(np.uint32) >> 16)
    w["head.bf16.weight"] = ("BF16", bits.astype(np.uint16))
    w["embeddings.word_embeddings.weight"] = rng.standard_normal((500, 64)).astype(np.float32)
    return w


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    weights = make_weights()
    single = root / "single"
    single.mkdir()
    write_safetensors(single / "model.safetensors", weights)
    sharded = root / "sharded"
    sharded.mkdir()
    names = list(weights)
    shards = [names[0::3], names[1::3], names[2::3]]  # interleaved: model order != shard order
    weight_map = {}
    for k, part in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(sharded / fname, {n: weights[n] for n in part})
        weight_map.update({n: fname for n in part})
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return single, sharded


def _records(result):
    return [{k: v for k, v in r.to_dict().items() if k != "model"} for r in result.records]


@pytest.mark.parametrize("options", [{}, {"min_q": 1.0, "include": ("embeddings",)},
                                     {"method": "svd", "fit_xmax": "max", "workers": 2}])
def test_sharded_equals_single(checkpoints, options):
    single, sharded = checkpoints
    a = analyze(single, **options)
    b = analyze(sharded, **options)
    c = analyze(sharded / "model.safetensors.index.json", **options)
    assert len(a.records) >= 7
    assert _records(a) == _records(b) == _records(c)
    assert a.summary.skipped == b.summary.skipped


@pytest.mark.parametrize("kind", ["single", "sharded"])
@pytest.mark.parametrize("workers", [1, 2])
def test_each_tensor_read_once_and_alone(checkpoints, monkeypatch, kind, workers):
    reads = []
    real = safetensors_file.read_tensor

    def counting(path, entry):
        reads.append(entry.info.name)
        return real(path, entry)

    monkeypatch.setattr(safetensors_file, "read_tensor", counting)
    folder = checkpoints[0] if kind == "single" else checkpoints[1]
    result = analyze(folder, workers=workers)
    analyzed = {r.name for r in result.records}
    assert sorted(reads) == sorted(analyzed)  # each analyzed tensor once, nothing else
    assert "encoder.layer.0.intermediate.dense.bias" not in reads


def test_reads_seek_one_tensor(checkpoints, monkeypatch):
    """A tensor read asks the file for exactly that tensor's bytes."""
    sizes = []
    real = safetensors_file.read_tensor

    def sized(path, entry):
        out = real(path, entry)
        sizes.append((entry.end - entry.begin, out.nbytes))
        return out

    monkeypatch.setattr(safetensors_file, "read_tensor", sized)
    analyze(checkpoints[1])
    total = sum(os.path.getsize(p) for p in checkpoints[1].glob("*.safetensors"))
    assert sizes and all(stored < total / 4 for stored, _ in sizes)
    assert all(widened in (stored, 2 * stored) for stored, widened in sizes)  # bf16 -> f32


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_command_does_not_import_torch(checkpoints, kind):
    folder = checkpoints[0] if kind == "single" else checkpoints[1]
    code = ("import sys; from allennlp_analyze.cli import main; "
            f"rc = main([{str(folder)!r}, '--format', 'csv', '--no-progress']); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr); "
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "NO-TORCH"
    assert "head.collapsed.weight" in proc.stdout
