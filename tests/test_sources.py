"""Weight sources: every kind of input read against an independent reference, bit for bit, and
every bad input turned into one AnalyzeError line naming the path."""
import gzip
import http.server
import io
import json
import os
import pickle
import socket
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import serving
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file as st_save_torch

from allennlp_analyze.errors import AnalyzeError
from allennlp_analyze.sources import open_source, remote
from allennlp_analyze.sources.module import layer_type
from allennlp_analyze.tensors import TensorInfo

REPO = Path(__file__).resolve().parents[1]
WHEEL09 = REPO / ".cache" / "wheels" / "allennlp-0.9.0-py3-none-any.whl"


def _wheel_archives():
    if not WHEEL09.is_file():
        return []
    with zipfile.ZipFile(WHEEL09) as z:
        return sorted(n for n in z.namelist() if n.endswith("model.tar.gz"))


ARCHIVES09 = _wheel_archives()


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal dtype, shape and bytes."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def check_error(excinfo, where, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message, message
    assert str(where) in message, message
    for fragment in fragments:
        assert fragment.lower() in message.lower(), message
    return message


# ---------------------------------------------------------------------------------------------
# Test data


def mixed_tensors():
    """Torch tensors of every storage dtype we care about, with awkward values."""
    g = torch.Generator().manual_seed(0)
    bits = np.concatenate([
        np.arange(0, 65536, 97, dtype=np.uint16),  # sweeps signs, subnormals, inf, NaN payloads
        np.array([0x0000, 0x8000, 0x0001, 0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFFFF], dtype=np.uint16),
    ])
    bits = bits[: (len(bits) // 8) * 8]
    return {
        "layer.10.weight": torch.randn(3, 5, generator=g),
        "layer.2.weight": torch.randn(4, 6, generator=g, dtype=torch.float64),
        "layer.2.half": torch.randn(7, 3, generator=g).half(),
        "layer.2.bf16": torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16).reshape(8, -1),
        "layer.1.bf16_random": torch.randn(16, 9, generator=g).bfloat16(),
        "emb.weight": torch.randn(11, 4, generator=g),
        "ids": torch.arange(12, dtype=torch.int64).reshape(3, 4),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 5),
        "f8a": torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn),
        "f8b": torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e5m2),
    }


def reference_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        return t.float().numpy()
    return t.numpy()


def expected_dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def same_or_nan(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equal except that NaNs need only be NaN in both (payloads may differ)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind == "f":
        nan_a, nan_b = np.isnan(a), np.isnan(b)
        return bool(np.array_equal(nan_a, nan_b) and same(np.where(nan_a, 0, a), np.where(nan_b, 0, b)))
    return same(a, b)


@pytest.fixture()
def src_st_file(tmp_path):
    tensors = mixed_tensors()
    path = tmp_path / "mixed.safetensors"
    st_save_torch(tensors, str(path))
    return path, tensors


def write_sharded(folder: Path, tensors: dict, n_shards=2, prefix="model", ext="safetensors"):
    names = list(tensors)
    chunks = [names[i::n_shards] for i in range(n_shards)]
    weight_map = {}
    for k, chunk in enumerate(chunks):
        shard = f"{prefix}-{k + 1:05d}-of-{n_shards:05d}.{ext}"
        part = {n: tensors[n] for n in chunk}
        if ext == "safetensors":
            st_save_torch(part, str(folder / shard))
        else:
            torch.save(part, folder / shard)
        weight_map.update({n: shard for n in chunk})
    index_name = f"{prefix}.{ext}.index.json" if ext == "safetensors" else "pytorch_model.bin.index.json"
    (folder / index_name).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return folder / index_name


class Payload:
    """A pickle that creates a file when unpickled (through builtins.open)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---------------------------------------------------------------------------------------------
# safetensors


def test_safetensors_file_bit_exact(src_st_file):
    path, tensors = src_st_file
    source = open_source(path)
    assert source.label == "mixed.safetensors"
    infos = source.tensors()
    # natural order: layer.1 < layer.2 < layer.10
    names = [i.name for i in infos]
    assert names.index("layer.1.bf16_random") < names.index("layer.2.bf16") < names.index("layer.10.weight")
    assert set(names) == set(tensors)
    by_name = {i.name: i for i in infos}
    numpy_kinds = {n for n, t in tensors.items() if t.dtype not in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)}
    with safe_open(str(path), framework="numpy") as f:  # the safetensors library's own numpy reader
        plain = {n: f.get_tensor(n) for n in numpy_kinds}
    with safe_open(str(path), framework="pt") as f:
        for name, t in tensors.items():
            info = by_name[name]
            assert info == TensorInfo(name, tuple(t.shape), expected_dtype(t), None)
            array = source.load(name)
            if name in plain:  # numpy-representable dtypes: identical to safetensors.numpy
                assert same(array, plain[name]), name
            ref = reference_numpy(f.get_tensor(name))
            assert same_or_nan(array, ref), name
            assert same_or_nan(array, reference_numpy(t)), name
    # bfloat16 widened exactly: the bits are the stored bits followed by 16 zero bits
    bf = source.load("layer.2.bf16")
    assert bf.dtype == np.float32
    stored = tensors["layer.2.bf16"].view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(bf.view(np.uint32) >> 16, stored) and not (bf.view(np.uint32) & 0xFFFF).any()
    assert np.isnan(bf).any() and np.isinf(bf).any()
    assert source.load("layer.2.half").dtype == np.float16
    assert source.load("layer.2.weight").dtype == np.float64
    assert source.load("scalar").shape == () and source.load("empty").shape == (0, 5)


def test_safetensors_reads_on_demand(tmp_path):
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((4, 4), dtype=np.float32)
    path = tmp_path / "ab.safetensors"
    st_save_torch({"a": torch.from_numpy(a), "b": torch.from_numpy(b)}, str(path))
    source = open_source(path)
    # rewrite b's bytes in place after opening: only what load() reads from disk comes back
    data = bytearray(path.read_bytes())
    start = data.index(b.tobytes())
    data[start:start + b.nbytes] = (b * 7).tobytes()
    path.write_bytes(bytes(data))
    assert same(source.load("a"), a) and same(source.load("b"), b * 7)
    assert source.load("a").flags.writeable  # a fresh array, the caller's to keep


def test_file_url_and_passthrough(src_st_file):
    path, tensors = src_st_file
    source = open_source(path.as_uri())
    assert source.label == "mixed.safetensors"
    assert open_source(source) is source


def test_sharded_safetensors_equals_single_file(tmp_path, src_st_file):
    path, tensors = src_st_file
    single = open_source(path)
    folder = tmp_path / "sharded"
    folder.mkdir()
    index = write_sharded(folder, tensors, n_shards=3)
    for spec in (index, folder, str(index)):
        sharded = open_source(spec)
        assert sharded.tensors() == single.tensors()
        for info in single.tensors():
            assert same(sharded.load(info.name), single.load(info.name)), info.name
    assert open_source(folder).label == "sharded"
    assert open_source(index).label == "model.safetensors.index.json"


def test_safetensors_reads_do_not_import_torch(tmp_path, src_st_file):
    path, tensors = src_st_file
    folder = tmp_path / "hf"
    folder.mkdir()
    write_sharded(folder, tensors)
    script = textwrap.dedent(f"""
        import sys
        from allennlp_analyze.sources import open_source
        assert "torch" not in sys.modules, "import"
        for spec in ({str(path)!r}, {str(folder)!r}):
            source = open_source(spec)
            for info in source.tensors():
                source.load(info.name)
        print("torch" in sys.modules, "safetensors" in sys.modules)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_minilm_real_checkpoint(minilm_path):
    source = open_source(minilm_path)
    infos = {i.name: i for i in source.tensors()}
    assert len(infos) == 6 * 16 + 6 + 2  # 6 layers x 16 + embeddings (6) + pooler (2)
    assert infos["encoder.layer.0.intermediate.dense.weight"] == TensorInfo(
        "encoder.layer.0.intermediate.dense.weight", (1536, 384), "float32", None)
    assert infos["encoder.layer.5.output.dense.weight"].shape == (384, 1536)
    assert infos["embeddings.word_embeddings.weight"].shape == (30522, 384)
    assert infos["embeddings.position_ids"].dtype == "int64"
    ff = [i for i in infos.values() if i.shape in ((1536, 384), (384, 1536))]
    attn = [n for n, i in infos.items() if i.shape == (384, 384) and ".attention." in n]
    assert len(ff) == 12 and len(attn) == 24
    with safe_open(str(minilm_path), framework="numpy") as f:
        assert set(f.keys()) == set(infos)
        for name in infos:
            assert same(source.load(name), f.get_tensor(name)), name
    # the package's model folder is a Hugging Face folder (config.json + model.safetensors)
    folder = open_source(minilm_path.parent)
    assert folder.label == "model" and folder.tensors() == source.tensors()


# ---------------------------------------------------------------------------------------------
# AllenNLP archives and serialization directories


def test_allennlp09_wheel_has_26_archives():
    assert WHEEL09.is_file(), f"{WHEEL09} is missing; `make venv` downloads it"
    assert len(ARCHIVES09) == 26


@pytest.fixture(scope="module")
def src_archives09(tmp_path_factory):
    folder = tmp_path_factory.mktemp("allennlp09")
    paths = {}
    with zipfile.ZipFile(WHEEL09) as z:
        for k, name in enumerate(ARCHIVES09):
            target = folder / f"{k:02d}" / "model.tar.gz"
            target.parent.mkdir()
            target.write_bytes(z.read(name))
            paths[name] = target
    return paths


def _reference_weights(archive: Path):
    with tarfile.open(archive, "r:gz") as tar:
        data = tar.extractfile("weights.th").read()
    return data, torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


@pytest.mark.parametrize("name", ARCHIVES09, ids=[n.split("fixtures/")[1].rsplit("/", 1)[0] for n in ARCHIVES09])
def test_allennlp09_archive(name, src_archives09, monkeypatch):
    path = src_archives09[name]
    data, reference = _reference_weights(path)
    assert not zipfile.is_zipfile(io.BytesIO(data))  # legacy (pre-1.6) torch serialization

    def no_extraction(*args, **kwargs):
        raise AssertionError("archives must not be extracted")

    monkeypatch.setattr(tarfile.TarFile, "extract", no_extraction)
    monkeypatch.setattr(tarfile.TarFile, "extractall", no_extraction)
    source = open_source(path)
    assert source.label == "model.tar.gz"
    infos = source.tensors()
    assert [i.name for i in infos] == list(reference)
    for info in infos:
        t = reference[info.name]
        assert info.shape == tuple(t.shape) and info.dtype == "float32" and info.module_type is None
        assert same(source.load(info.name), t.numpy()), info.name


def test_serialization_dir(tmp_path):
    g = torch.Generator().manual_seed(1)
    best = {"encoder.weight": torch.randn(5, 4, generator=g), "encoder.bias": torch.randn(5, generator=g)}
    other = {k: v + 1 for k, v in best.items()}
    run = tmp_path / "run1"
    run.mkdir()
    (run / "config.json").write_text("{}")
    torch.save(other, run / "model_state_epoch_0.th")
    torch.save(best, run / "best.th")
    torch.save({"optimizer": {}}, run / "training_state_epoch_0.th")
    source = open_source(run)
    assert source.label == "run1"
    assert [i.name for i in source.tensors()] == ["encoder.weight", "encoder.bias"]
    assert same(source.load("encoder.weight"), best["encoder.weight"].numpy())

    # no best.th: the latest checkpoint, by epoch number (10 > 2), and by batch for 2.x names
    (run / "best.th").unlink()
    torch.save(best, run / "model_state_epoch_10.th")
    torch.save(other, run / "model_state_epoch_2.th")
    assert same(open_source(run).load("encoder.bias"), best["encoder.bias"].numpy())
    run2 = tmp_path / "run2"
    run2.mkdir()
    torch.save(other, run2 / "model_state_e3_b9.th")
    torch.save(best, run2 / "model_state_e3_b120.th")
    assert same(open_source(run2).load("encoder.bias"), best["encoder.bias"].numpy())

    # a serialization dir holding only the archive
    run3 = tmp_path / "run3"
    run3.mkdir()
    buf = io.BytesIO()
    torch.save(best, buf)
    make_tar_gz(run3 / "model.tar.gz", {"config.json": b"{}", "weights.th": buf.getvalue()})
    assert same(open_source(run3).load("encoder.weight"), best["encoder.weight"].numpy())


def make_tar_gz(path: Path, members: dict, symlinks=()):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in symlinks:
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)


def test_archive_with_top_folder_and_best_th(tmp_path):
    sd = {"w": torch.randn(3, 3)}
    buf = io.BytesIO()
    torch.save(sd, buf)
    path = tmp_path / "m.tgz"
    make_tar_gz(path, {"model/config.json": b"{}", "model/best.th": buf.getvalue()})
    assert same(open_source(path).load("w"), sd["w"].numpy())


# ---------------------------------------------------------------------------------------------
# PyTorch state dicts, modules, mappings, Hugging Face folders


@pytest.mark.parametrize("suffix,legacy", [(".th", False), (".pt", True), (".pth", False), (".bin", False)])
def test_torch_state_dict_file(tmp_path, suffix, legacy):
    tensors = {k: v for k, v in mixed_tensors().items() if not k.startswith("f8")}
    path = tmp_path / f"weights{suffix}"
    torch.save(tensors, path, _use_new_zipfile_serialization=not legacy)
    source = open_source(path)
    assert source.label == path.name
    infos = source.tensors()
    assert [i.name for i in infos] == list(tensors)  # the file's (model) order
    for info in infos:
        t = tensors[info.name]
        assert info.shape == tuple(t.shape) and info.dtype == expected_dtype(t)
        assert same_or_nan(source.load(info.name), reference_numpy(t)), info.name


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_training_checkpoint_is_unwrapped(tmp_path, wrapper):
    sd = {"a.weight": torch.randn(2, 3), "a.bias": torch.randn(2)}
    path = tmp_path / "ckpt.pt"
    torch.save({wrapper: sd, "epoch": 3, "optimizer": {"lr": 0.1}}, path)
    source = open_source(path)
    assert [i.name for i in source.tensors()] == ["a.weight", "a.bias"]
    assert same(source.load("a.bias"), sd["a.bias"].numpy())


class Net(nn.Module):
    class MyLinear(nn.Linear):
        pass

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.lstm = nn.LSTM(8, 6, bidirectional=True)
        self.gru = nn.GRU(12, 4)
        self.attn = nn.MultiheadAttention(8, 2)
        self.conv1 = nn.Conv1d(3, 5, 3)
        self.conv2 = nn.Conv2d(2, 3, (3, 2))
        self.mine = Net.MyLinear(4, 3)
        self.norm = nn.BatchNorm1d(3)
        self.scale = nn.Parameter(torch.ones(3))


def test_module_source():
    torch.manual_seed(0)
    net = Net()
    source = open_source(net)
    assert source.label == "Net"
    infos = source.tensors()
    state = net.state_dict()
    assert [i.name for i in infos] == list(state)
    types = {i.name: i.module_type for i in infos}
    assert types["emb.weight"] == "Embedding"
    assert types["lstm.weight_ih_l0"] == types["lstm.weight_hh_l0_reverse"] == "LSTM"
    assert types["gru.weight_hh_l0"] == "GRU"
    assert types["attn.in_proj_weight"] == "MultiheadAttention"
    assert types["attn.out_proj.weight"] == "Linear"  # NonDynamicallyQuantizableLinear
    assert types["conv1.weight"] == "Conv1d" and types["conv2.weight"] == "Conv2d"
    assert types["mine.weight"] == "Linear"
    assert types["norm.running_mean"] == "BatchNorm1d"
    assert types["scale"] == "Net"
    for info in infos:
        t = state[info.name]
        assert info.shape == tuple(t.shape) and info.dtype == expected_dtype(t)
        array = source.load(info.name)
        assert same(array, t.numpy())
        assert not array.flags.writeable  # the live weights cannot be modified through it
    assert layer_type(nn.Linear) == "Linear"


def test_module_bfloat16_and_grad():
    lin = nn.Linear(4, 3).to(torch.bfloat16)
    source = open_source(lin)
    info = {i.name: i for i in source.tensors()}["weight"]
    assert info.dtype == "bfloat16" and info.module_type == "Linear"
    assert same(source.load("weight"), lin.weight.detach().float().numpy())


def test_mapping_sources():
    g = torch.Generator().manual_seed(2)
    torch_sd = {"x.weight": torch.randn(3, 2, generator=g), "x.half": torch.randn(2).half()}
    source = open_source(torch_sd)
    assert source.label == "state dict"
    assert source.tensors() == [TensorInfo("x.weight", (3, 2), "float32"), TensorInfo("x.half", (2,), "float16")]
    assert same(source.load("x.half"), torch_sd["x.half"].numpy())
    numpy_sd = {"b": np.arange(6, dtype=np.float64).reshape(2, 3), "a": np.ones(4, dtype=np.float16)}
    source = open_source(numpy_sd)
    assert source.tensors() == [TensorInfo("b", (2, 3), "float64"), TensorInfo("a", (4,), "float16")]
    assert same(source.load("b"), numpy_sd["b"]) and same(source.load("a"), numpy_sd["a"])
    assert same(open_source({"model": numpy_sd}).load("b"), numpy_sd["b"])


def test_hf_folders(tmp_path):
    tensors = {k: v for k, v in mixed_tensors().items() if not k.startswith("f8")}
    # safetensors preferred over pytorch_model.bin
    both = tmp_path / "both"
    both.mkdir()
    (both / "config.json").write_text("{}")
    st_save_torch(tensors, str(both / "model.safetensors"))
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in tensors.items()}, both / "pytorch_model.bin")
    source = open_source(both)
    assert source.label == "both"
    assert same(source.load("emb.weight"), tensors["emb.weight"].numpy())
    # pytorch_model.bin alone
    (both / "model.safetensors").unlink()
    assert same(open_source(both).load("emb.weight"), (tensors["emb.weight"] + 1).numpy())
    # sharded pytorch checkpoint: shard order, then each shard's own order
    sharded = tmp_path / "sharded_bin"
    sharded.mkdir()
    index = write_sharded(sharded, tensors, n_shards=2, prefix="pytorch_model", ext="bin")
    names = list(tensors)
    for spec in (sharded, index):
        source = open_source(spec)
        assert [i.name for i in source.tensors()] == names[0::2] + names[1::2]
        for name, t in tensors.items():
            assert same_or_nan(source.load(name), reference_numpy(t)), name


def test_unknown_suffix_is_sniffed(tmp_path, src_st_file):
    path, tensors = src_st_file
    blob = tmp_path / "blob"
    blob.write_bytes(path.read_bytes())
    assert same(open_source(blob).load("emb.weight"), tensors["emb.weight"].numpy())
    blob2 = tmp_path / "blob2"
    torch.save({"w": tensors["emb.weight"]}, blob2)
    assert same(open_source(blob2).load("w"), tensors["emb.weight"].numpy())


# ---------------------------------------------------------------------------------------------
# URLs


class _Handler(http.server.SimpleHTTPRequestHandler):
    log = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).log.append(self.path)
        if self.path.startswith("/truncated/"):
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"\0" * 1000)
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture()
def src_http(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    with serving(root, _Handler) as (base, log):
        yield base, root, log


def test_url_download_and_cache_hit(src_http, src_st_file, tmp_path, capsys):
    base, root, log = src_http
    path, tensors = src_st_file
    (root / "models").mkdir()
    (root / "models" / "mixed.safetensors").write_bytes(path.read_bytes())
    url = f"{base}/models/mixed.safetensors"
    cache = tmp_path / "cache"
    before = remote.download_count
    source = open_source(url, cache_dir=cache, progress=False)
    assert source.label == "mixed.safetensors"
    local = open_source(path)
    assert source.tensors() == local.tensors()
    for info in local.tensors():
        assert same(source.load(info.name), local.load(info.name))
    cached = remote.cache_path(url, cache)
    assert cached.is_file() and cached.read_bytes() == path.read_bytes()
    assert cached.parent.parent == cache and cached.name == "mixed.safetensors"
    assert [p.name for p in cached.parent.iterdir()] == ["mixed.safetensors"]  # no partial files left
    # second open: served from the cache, no request
    open_source(url, cache_dir=cache).tensors()
    assert log == ["/models/mixed.safetensors"]
    assert remote.download_count == before + 1
    assert capsys.readouterr().err == ""  # progress=False (and stderr is no TTY under pytest)


def test_url_cache_location_and_progress(src_http, src_st_file, tmp_path, monkeypatch, capsys):
    pytest.importorskip("tqdm")
    base, root, log = src_http
    path, _ = src_st_file
    (root / "a.safetensors").write_bytes(path.read_bytes())
    url = f"{base}/a.safetensors"
    monkeypatch.setenv("ALLENNLP_ANALYZE_CACHE", str(tmp_path / "envcache"))
    open_source(url, progress=True)
    assert remote.cache_path(url).parent.parent == tmp_path / "envcache"
    assert remote.cache_path(url).is_file()
    assert capsys.readouterr().err != ""  # the forced progress bar went to stderr
    monkeypatch.delenv("ALLENNLP_ANALYZE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    open_source(url, progress=False)
    assert (tmp_path / "home" / ".cache" / "allennlp_analyze" / remote.cache_path(url).parent.name).is_dir()
    assert len(log) == 2


def test_url_archive_and_sharded_index(src_http, src_st_file, tmp_path):
    base, root, log = src_http
    path, tensors = src_st_file
    write_sharded(root, tensors, n_shards=2)
    source = open_source(f"{base}/model.safetensors.index.json", cache_dir=tmp_path / "c")
    assert source.label == "model.safetensors.index.json"
    local = open_source(path)
    assert source.tensors() == local.tensors()
    for info in local.tensors():
        assert same(source.load(info.name), local.load(info.name))
    assert sorted(log) == ["/model-00001-of-00002.safetensors", "/model-00002-of-00002.safetensors",
                           "/model.safetensors.index.json"]
    open_source(f"{base}/model.safetensors.index.json", cache_dir=tmp_path / "c")
    assert len(log) == 3
    # an AllenNLP archive by URL
    with zipfile.ZipFile(WHEEL09) as z:
        (root / "bidaf.tar.gz").write_bytes(z.read("allennlp/tests/fixtures/bidaf/serialization/model.tar.gz"))
    source = open_source(f"{base}/bidaf.tar.gz", cache_dir=tmp_path / "c")
    assert source.label == "bidaf.tar.gz" and len(source.tensors()) == 24


def test_url_keras_sharded_index_fetches_its_shards(src_http, tmp_path):
    """A URL to Keras's sharded ``*.weights.json`` fetches the shards it names from beside it
    (once), and reads as the local folder does."""
    from hostile_inputs import keras_sharded_hostile

    base, root, log = src_http
    good = keras_sharded_hostile(tmp_path / "k")["good"]
    for f in good.parent.iterdir():
        (root / f.name).write_bytes(f.read_bytes())
    source = open_source(f"{base}/m.weights.json", cache_dir=tmp_path / "c")
    local = open_source(good)
    assert source.tensors() == local.tensors() and len(local.tensors()) == 2
    for info in local.tensors():
        assert same(source.load(info.name), local.load(info.name))
    assert sorted(log) == ["/m.weights.json", "/m_00000.weights.h5", "/m_00001.weights.h5"]
    open_source(f"{base}/m.weights.json", cache_dir=tmp_path / "c")
    assert len(log) == 3

def test_url_errors(src_http, tmp_path):
    base, root, log = src_http
    cache = tmp_path / "cache"
    url = f"{base}/missing.tar.gz"
    with pytest.raises(AnalyzeError) as e:
        open_source(url, cache_dir=cache)
    check_error(e, url, "404")

    url = f"{base}/truncated/model.safetensors"
    with pytest.raises(AnalyzeError) as e:
        open_source(url, cache_dir=cache)
    check_error(e, url, "truncated", "1000 of 100000")
    assert not any(p.is_file() for p in cache.rglob("*"))  # neither the file nor a partial one

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/model.tar.gz"
    with pytest.raises(AnalyzeError) as e:
        open_source(url, cache_dir=cache)
    check_error(e, url, "refused")

    with pytest.raises(AnalyzeError) as e:
        open_source("ftp://example.org/model.tar.gz")
    check_error(e, "ftp://example.org/model.tar.gz", "unsupported")


# ---------------------------------------------------------------------------------------------
# Bad input


def test_missing_and_empty(tmp_path):
    for path in (tmp_path / "nope.tar.gz", tmp_path / "nope"):
        with pytest.raises(AnalyzeError) as e:
            open_source(path)
        check_error(e, path, "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("hi")
    (empty / "config.json").write_text("{}")
    with pytest.raises(AnalyzeError) as e:
        open_source(empty)
    check_error(e, empty, "no model weights")
    two = tmp_path / "two"
    two.mkdir()
    st_save_torch({"a": torch.ones(2)}, str(two / "x.safetensors"))
    st_save_torch({"a": torch.ones(2)}, str(two / "y.safetensors"))
    with pytest.raises(AnalyzeError) as e:
        open_source(two)
    check_error(e, two, "several weight files")


@pytest.fixture(scope="module")
def src_bidaf_bytes():
    with zipfile.ZipFile(WHEEL09) as z:
        return z.read("allennlp/tests/fixtures/bidaf/serialization/model.tar.gz")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case,fragment", [
    ("truncated", "truncated"),
    ("cut_trailer", "truncated"),
    ("corrupt", "corrupt"),
    ("not_gzip", "is not a gzip tar archive"),
    ("gzip_not_tar", "is not a gzip tar archive"),
    ("empty", "is not a gzip tar archive"),
    ("no_weights", "holds no weights.th"),
    ("symlink_weights", "link"),
])
def test_bad_archives(tmp_path, src_bidaf_bytes, case, fragment):
    path = tmp_path / "model.tar.gz"
    data = src_bidaf_bytes
    if case == "truncated":
        _write(path, data[: len(data) // 2])
    elif case == "cut_trailer":
        _write(path, data[:-4])
    elif case == "corrupt":
        flipped = bytearray(data)
        flipped[len(data) // 3] ^= 0xFF
        _write(path, bytes(flipped))
    elif case == "not_gzip":
        _write(path, b"this is not an archive\n")
    elif case == "gzip_not_tar":
        _write(path, gzip.compress(b"just text " * 100))
    elif case == "empty":
        _write(path, b"")
    elif case == "no_weights":
        make_tar_gz(path, {"config.json": b"{}", "vocabulary/tokens.txt": b"a\n"})
    elif case == "symlink_weights":
        make_tar_gz(path, {"config.json": b"{}"}, symlinks=[("weights.th", "/etc/passwd")])
    with pytest.raises(AnalyzeError) as e:
        open_source(path)
    check_error(e, path, fragment)


def _safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


@pytest.mark.parametrize("case,fragment", [
    ("bad_json", "corrupt safetensors header"),
    ("huge_length", "corrupt safetensors header"),
    ("length_past_end", "header length"),
    ("bad_dtype", "unknown dtype"),
    ("offsets_mismatch", "do not match"),
    ("not_object", "corrupt safetensors header"),
    ("truncated_data", "truncated"),
    ("tiny", "truncated"),
])
def test_bad_safetensors(tmp_path, src_st_file, case, fragment):
    path = tmp_path / "bad.safetensors"
    good = src_st_file[0].read_bytes()
    if case == "bad_json":
        _write(path, (10).to_bytes(8, "little") + b"{not json}" + b"\0" * 16)
    elif case == "huge_length":
        _write(path, (2**62).to_bytes(8, "little") + b"{}")
    elif case == "length_past_end":
        _write(path, (5000).to_bytes(8, "little") + b"{}")
    elif case == "bad_dtype":
        _write(path, _safetensors_bytes({"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8))
    elif case == "offsets_mismatch":
        _write(path, _safetensors_bytes({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8))
    elif case == "not_object":
        _write(path, _safetensors_bytes([1, 2, 3]))
    elif case == "truncated_data":
        _write(path, good[:-100])
    elif case == "tiny":
        _write(path, b"\x01\x02")
    with pytest.raises(AnalyzeError) as e:
        open_source(path)
    check_error(e, path, fragment)


def test_bad_sharded_index(tmp_path, src_st_file):
    _, tensors = src_st_file
    index = write_sharded(tmp_path, tensors, n_shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(AnalyzeError) as e:
        open_source(index)
    check_error(e, index, "does not exist")
    index.write_text(json.dumps({"weight_map": {"w": "../../etc/passwd"}}))
    with pytest.raises(AnalyzeError) as e:
        open_source(index)
    check_error(e, index, "bad shard file")
    index.write_text("{oops")
    with pytest.raises(AnalyzeError) as e:
        open_source(index)
    check_error(e, index, "not a valid checkpoint index")


def test_unknown_file_type(tmp_path):
    for name, data in (("notes.txt", b"hello\n"), ("blob", os.urandom(64))):
        path = _write(tmp_path / name, data)
        with pytest.raises(AnalyzeError) as e:
            open_source(path)
        check_error(e, path, "not a recognised weights file")
    # an .h5 file is HDF5, read as Keras weights (tests/test_keras.py): a broken one says so
    path = _write(tmp_path / "weights.h5", b"\x89HDF\r\n\x1a\n")
    with pytest.raises(AnalyzeError) as e:
        open_source(path)
    check_error(e, path, "is not a readable HDF5 file")


def test_bad_torch_files(tmp_path):
    path = tmp_path / "ints.th"
    torch.save({"a": 1, "b": "text"}, path)
    with pytest.raises(AnalyzeError) as e:
        open_source(path)
    check_error(e, path, "not a plain tensor state dict")

    path = tmp_path / "list.pt"
    torch.save([1.5, 2], path)
    with pytest.raises(AnalyzeError) as e:
        open_source(path)
    check_error(e, path, "not a plain tensor state dict", "no tensors", "a list of 2 entries")

    # Tensors beside plain values are read (the values ignored): issue 16's checkpoints.
    path = tmp_path / "mixed.pt"
    torch.save({"w": torch.ones(2), "step": 3}, path)
    assert [i.name for i in open_source(path).tensors()] == ["w"]

    good = io.BytesIO()
    torch.save({"w": torch.randn(100, 100)}, good)
    for legacy in (False, True):
        buf = io.BytesIO()
        torch.save({"w": torch.randn(100, 100)}, buf, _use_new_zipfile_serialization=not legacy)
        path = _write(tmp_path / f"cut{int(legacy)}.th", buf.getvalue()[: len(buf.getvalue()) // 2])
        with pytest.raises(AnalyzeError) as e:
            open_source(path)
        check_error(e, path, "truncated")

    with pytest.raises(AnalyzeError) as e:
        open_source({"step": 3, "n": "text"})
    check_error(e, "state dict", "no tensors", "'n' (str)")
    with pytest.raises(AnalyzeError) as e:
        open_source({})
    check_error(e, "state dict", "no tensors")


def test_malicious_pickles_never_run(tmp_path):
    marker = tmp_path / "pwned"
    payload = Payload(marker)
    # the payload is live: plain pickle would run it
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Payload(probe)))
    assert probe.exists()

    raw_pickle = _write(tmp_path / "raw.th", pickle.dumps({"w": payload}, protocol=2))
    zip_format = tmp_path / "zip.pt"
    torch.save({"w": payload}, zip_format)
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": payload}, legacy, _use_new_zipfile_serialization=False)
    whole = tmp_path / "module.pth"
    torch.save(payload, whole)
    buf = io.BytesIO()
    torch.save({"w": payload}, buf)
    archive = tmp_path / "model.tar.gz"
    make_tar_gz(archive, {"config.json": b"{}", "weights.th": buf.getvalue()})
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "pytorch_model.bin").write_bytes(buf.getvalue())
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.th").write_bytes(buf.getvalue())

    for path in (raw_pickle, zip_format, legacy, whole, archive, hf, run):
        with pytest.raises(AnalyzeError) as e:
            open_source(path)
        message = check_error(e, path, "is not a plain tensor state dict (refused to unpickle arbitrary objects")
        assert "open" in message  # names the refused global
        assert not marker.exists(), path


def test_inside_folder_allows_hub_blobs_only_in_a_hub_snapshot(tmp_path):
    """A link in a Hugging Face cache snapshot may lead into its repository's ``blobs/`` (the
    hub's cache keeps every file there); anywhere else, and to anywhere else, a link leading
    out of the folder is refused."""
    from allennlp_analyze.sources._common import inside_folder

    repo = tmp_path / "hub" / "models--org--name"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    (blobs / "f00d").write_bytes(b"x")
    (tmp_path / "secret").write_bytes(b"x")
    (snap / "shard.h5").symlink_to(blobs / "f00d")
    (snap / "out.h5").symlink_to(tmp_path / "secret")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "shard.h5").symlink_to(blobs / "f00d")
    assert inside_folder(snap, "shard.h5")
    assert not inside_folder(snap, "out.h5")
    assert not inside_folder(snap, "../../blobs/f00d")  # a ".." name, whatever it reaches
    assert not inside_folder(plain, "shard.h5")
    assert not inside_folder(snap, "a\x00b.h5")  # a NUL: refused, not a ValueError
    # a snapshot whose blobs/ is itself a link (to / here) allows nothing beyond the folder
    evil = tmp_path / "evil" / "models--org--evil"
    (evil / "snapshots" / "r").mkdir(parents=True)
    (evil / "blobs").symlink_to("/")
    (evil / "snapshots" / "r" / "w.dat").symlink_to(tmp_path / "secret")
    assert not inside_folder(evil / "snapshots" / "r", "w.dat")
