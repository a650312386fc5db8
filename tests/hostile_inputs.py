"""Generators of hostile and broken inputs for the hostile-input tests: archives, safetensors
files, special files and misbehaving HTTP servers, all built on the spot (no data files)."""
import gzip
import http.server
import io
import json
import os
import socket
import struct
import tarfile
import threading
import time
import zipfile
import zlib
from pathlib import Path
from typing import Dict, Iterable, Optional

import numpy as np

GIB = 2**30


def torch_bytes(state: dict) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def torchscript_archive(path: Path, drop: Optional[str] = None, cut: Optional[str] = None) -> Path:
    """``torch.jit.save`` of a scripted ``nn.Linear(4, 3)`` (storages ``data/0``: weight,
    ``data/1``: bias), with the record ``drop`` left out or the record ``cut`` one element
    short (a size that lies)."""
    import zipfile

    import torch

    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 3)), buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            folder, _, rest = info.filename.partition("/")
            data = src.read(info)
            if rest == drop:
                continue
            dst.writestr(info, data[:-4] if rest == cut else data)
    return path


def member_bytes(name: str, data: bytes, size: Optional[int] = None) -> bytes:
    """One tar member as bytes: header (declaring ``size``, default ``len(data)``) and data."""
    info = tarfile.TarInfo(name)
    info.size = len(data) if size is None else size
    return info.tobuf(format=tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % 512)


def tar_bytes(members: Iterable) -> bytes:
    """An uncompressed tar of ``members``: ``(name, bytes)`` for regular files or ready
    ``TarInfo`` objects (links, FIFOs, folders)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def tar_gz(path: Path, members: Iterable) -> Path:
    path.write_bytes(gzip.compress(tar_bytes(members), compresslevel=1))
    return path


def link(name: str, target: str, kind=tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def special(name: str, kind) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info


def zeros_gzip(nbytes: int) -> bytes:
    """gzip members whose concatenation decompresses to ``nbytes`` zero bytes, built from one
    compressed 64 MiB block (so that 10 GiB costs ~10 MB and no time)."""
    block = 64 * 2**20
    one = gzip.compress(b"\0" * block, compresslevel=9)
    full, rest = divmod(nbytes, block)
    return one * full + (gzip.compress(b"\0" * rest, compresslevel=9) if rest else b"")


def bomb_archive(path: Path, declared_member: bool, weights: bytes, config: bytes) -> Path:
    """A ``model.tar.gz`` of 10 GiB of zeros: as the ``weights.th`` member itself
    (``declared_member``), or after a small valid archive, inside its gzip stream."""
    if declared_member:
        head = member_bytes("config.json", config) + member_bytes("weights.th", b"", 10 * GIB)
        path.write_bytes(gzip.compress(head) + zeros_gzip(10 * GIB))
    else:
        path.write_bytes(gzip.compress(tar_bytes([("config.json", config), ("weights.th", weights)]))
                         + zeros_gzip(10 * GIB))
    return path


def safetensors_bytes(header, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def safetensors_file(path: Path, tensors: Dict[str, np.ndarray]) -> Path:
    header, chunks, offset = {}, [], 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    path.write_bytes(safetensors_bytes(header, b"".join(chunks)))
    return path


_SAFETENSORS_DTYPES = {"int32": "I32", "float16": "F16", "float32": "F32", "uint8": "U8",
                       "int8": "I8", "int64": "I64"}


def packed_folder(path: Path, tensors: Dict[str, np.ndarray], config: Optional[dict]) -> Path:
    """A model folder of packed quantized layers: ``model.safetensors`` holding ``tensors`` in
    their own dtypes, and ``config.json`` when ``config`` is given."""
    path.mkdir(parents=True, exist_ok=True)
    header, chunks, offset = {}, [], 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[array.dtype.name],
                        "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    (path / "model.safetensors").write_bytes(safetensors_bytes(header, b"".join(chunks)))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


def gptq_layer(prefix: str = "model.layers.0.mlp.up_proj", out: int = 64, columns: int = 128,
               group_size: int = 32) -> Dict[str, np.ndarray]:
    """One symmetric 4-bit GPTQ layer (v1 zeros) of random codes: qweight, qzeros, scales,
    g_idx."""
    rng = np.random.default_rng(0)
    groups = columns // group_size
    return {f"{prefix}.qweight": rng.integers(-2**31, 2**31, (columns // 8, out), dtype=np.int64)
            .astype(np.int32),
            f"{prefix}.qzeros": np.full((groups, out // 8), 0x77777777, np.int32),
            f"{prefix}.scales": (rng.random((groups, out)) * 0.01 + 1e-3).astype(np.float16),
            f"{prefix}.g_idx": (np.arange(columns) // group_size).astype(np.int32)}


def lora_adapter(folder: Path, config: dict, tensors: Dict[str, np.ndarray]) -> Path:
    """A PEFT LoRA adapter folder: ``adapter_config.json`` (``config`` over PEFT's defaults)
    and ``adapter_model.safetensors`` holding ``tensors``."""
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["fc"], **config}))
    safetensors_file(folder / "adapter_model.safetensors", tensors)
    return folder


def tiny_matrices(path: Path, n: int) -> Path:
    """``n`` float32 3 x 2 matrices named ``m{i}.weight``."""
    header = {f"m{i}.weight": {"dtype": "F32", "shape": [3, 2], "data_offsets": [24 * i, 24 * i + 24]}
              for i in range(n)}
    data = np.random.default_rng(0).standard_normal(6 * n).astype("<f4").tobytes()
    path.write_bytes(safetensors_bytes(header, data))
    return path


def sparse_safetensors(path: Path, rows: int, cols: int) -> Path:
    """A float32 rows x cols matrix whose data is a hole in the file (no disk space used)."""
    with open(path, "wb") as f:
        f.write(safetensors_bytes({"big.weight": {"dtype": "F32", "shape": [rows, cols],
                                                  "data_offsets": [0, 4 * rows * cols]}}))
        f.truncate(f.tell() + 4 * rows * cols)
    return path


def gguf_string(text: str, length: Optional[int] = None) -> bytes:
    """A GGUF string: u64 length (``length``, default the true one) and UTF-8 bytes."""
    raw = text.encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def gguf_bytes(tensors=(("w.weight", (64, 8), 0, 0),), n_tensors: Optional[int] = None,
               kv: bytes = b"", n_kv: int = 0, data: Optional[bytes] = None) -> bytes:
    """A GGUF v3 file written by hand: ``kv`` (``n_kv`` raw key-value pairs), tensor infos
    ``(name, ne (row length first), GGML type, offset)`` (``n_tensors`` may lie about their
    number), then ``data`` at the next multiple of 32 (default: what the infos claim, F32)."""
    infos = b"".join(gguf_string(name) + struct.pack("<I", len(ne))
                     + b"".join(struct.pack("<Q", n) for n in ne) + struct.pack("<IQ", t, off)
                     for name, ne, t, off in tensors)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors,
                                 n_kv) + kv + infos
    head += b"\0" * (-len(head) % 32)
    if data is None:
        data = np.random.default_rng(0).standard_normal(
            sum(int(np.prod(ne)) for _, ne, _, _ in tensors)).astype("<f4").tobytes()
    return head + data


def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


# -- ONNX (the onnx package builds them) -------------------------------------------------------

def onnx_matmul_model(weights: Dict[str, np.ndarray]):
    """An ONNX ``ModelProto``: ``x`` multiplied by each float32 weight in turn (``MatMul``,
    weights as initializers, shapes chained in x in)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, value = [], "x"
    first = next(iter(weights.values()))
    for i, name in enumerate(weights):
        nodes.append(helper.make_node("MatMul", [value, name], [f"h{i}"], name=f"/mm{i}/MatMul"))
        value = f"h{i}"
    last = list(weights.values())[-1]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, first.shape[0]])],
        [helper.make_tensor_value_info(value, TensorProto.FLOAT, [1, last.shape[1]])],
        [numpy_helper.from_array(np.asarray(w, dtype=np.float32), name)
         for name, w in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def onnx_external(folder: Path, weights: Dict[str, np.ndarray], location: str = "weights.bin",
                  offset: Optional[int] = None) -> Path:
    """``model.onnx`` in ``folder`` with its weights in the external file ``weights.bin``; the
    first tensor's recorded ``location`` (and ``offset``, where given) then replaced."""
    import onnx

    model = onnx_matmul_model(weights)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, folder / "model.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    model = onnx.load(folder / "model.onnx", load_external_data=False)
    entries = model.graph.initializer[0].external_data
    for entry in entries:
        if entry.key == "location":
            entry.value = location
        if entry.key == "offset" and offset is not None:
            entry.value = str(offset)
    if offset is not None and not any(e.key == "offset" for e in entries):
        entries.add(key="offset", value=str(offset))
    onnx.save_model(model, folder / "model.onnx")
    return folder / "model.onnx"


def onnx_absurd_dims(path: Path) -> Path:
    """An ONNX file whose one initializer declares 10**12 x 10**12 floats and holds 16 bytes."""
    import onnx

    model = onnx_matmul_model({"w": np.ones((2, 2))})
    del model.graph.initializer[0].dims[:]
    model.graph.initializer[0].dims.extend([10**12, 10**12])
    onnx.save_model(model, path)
    return path


# -- HTTP -------------------------------------------------------------------------------------

class Routes:
    """What the misbehaving server answers, by path prefix; files under ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self.log = []
        self.stop = threading.Event()
        self.gzip_bomb = zeros_gzip(4 * GIB)


class HostileHandler(http.server.BaseHTTPRequestHandler):
    routes: Routes = None
    protocol_version = "HTTP/1.0"

    def log_message(self, *args):
        pass

    def _send(self, body: bytes, headers: Optional[dict] = None, status: int = 200,
              length: bool = True):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _drip(self, data: bytes, every: float = 0.3):
        """One byte every ``every`` seconds, until the client leaves or the server stops."""
        try:
            for i in range(len(data)):
                if type(self).routes.stop.wait(every):
                    return
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
        except OSError:
            pass

    def do_GET(self):
        routes = type(self).routes
        routes.log.append(self.path)
        kind, _, rest = self.path.lstrip("/").partition("/")
        file = routes.root / rest if rest else None
        data = file.read_bytes() if file is not None and file.is_file() else b""
        if kind == "file":
            self._send(data)
        elif kind == "silent":  # accepts, reads the request, says nothing
            routes.stop.wait(30)
        elif kind == "drip-headers":
            self._drip(b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\n0123456789")
        elif kind == "drip-body":
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:100])
            self._drip(data[100:])
        elif kind == "html":
            self._send(b"<!DOCTYPE html><html><body>Sign in to download</body></html>",
                       {"Content-Type": "text/html; charset=utf-8"})
        elif kind == "no-length":  # half the file, then the connection closes
            self._send(data[: len(data) // 2], length=False)
        elif kind == "gzip-label":  # a .tar.gz served as if gzip were its transfer encoding
            self._send(data, {"Content-Encoding": "gzip"})
        elif kind == "gzip-encoded":
            self._send(gzip.compress(data), {"Content-Encoding": "gzip"})
        elif kind == "deflate-encoded":
            self._send(zlib.compress(data), {"Content-Encoding": "deflate"})
        elif kind == "br-encoded":
            self._send(data, {"Content-Encoding": "br"})
        elif kind == "gzip-bomb":
            self._send(routes.gzip_bomb, {"Content-Encoding": "gzip"})
        elif kind == "loop":
            self._send(b"", {"Location": self.path}, status=302)
        elif kind == "endless":  # no length, zeros until the client gives up
            self.send_response(200)
            self.end_headers()
            block = b"\0" * 2**16
            try:
                while not routes.stop.is_set():
                    self.wfile.write(block)
            except OSError:
                pass
        elif kind == "huge-length":
            self.send_response(200)
            self.send_header("Content-Length", str(10**13))
            self.end_headers()
        else:
            self._send(b"not found", status=404)


class HostileServer:
    """The misbehaving server on 127.0.0.1, and a port whose listen backlog is full (connecting
    to it hangs until the client's connect timeout)."""

    def __init__(self, root: Path):
        self.routes = Routes(root)
        handler = type("Handler", (HostileHandler,), {"routes": self.routes})
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.backlog = socket.socket()
        self.backlog.bind(("127.0.0.1", 0))
        self.backlog.listen(0)
        self.fillers = []
        for _ in range(4):  # fill the accept queue; later SYNs are dropped
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(self.backlog.getsockname())
            except BlockingIOError:
                pass
            self.fillers.append(s)
        time.sleep(0.2)
        self.full_backlog = f"http://127.0.0.1:{self.backlog.getsockname()[1]}/model.safetensors"

    def close(self):
        self.routes.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        for s in self.fillers + [self.backlog]:
            s.close()


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def onnx_sparse(path: Path, dims, indices, values) -> Path:
    """An ONNX file whose one weight ``w`` (``x @ w``) is a sparse initializer of dense shape
    ``dims``, its ``values`` (float32) at ``indices`` (int64, linear or per axis), as given."""
    from onnx import TensorProto, helper, numpy_helper

    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(np.asarray(values, np.float32), "w"),
        numpy_helper.from_array(np.asarray(indices, np.int64), "w_indices"), dims)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="/mm/MatMul")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, dims[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, dims[1]])],
        sparse_initializer=[sparse])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    return path


def onnx_qdq_conv(path: Path, shape, scale_length: int, axis: int = 0) -> Path:
    """An ONNX file whose ``Conv`` weight is ``DequantizeLinear(codes, scale, axis=axis)``: int8
    codes of ``shape`` (out, in, *k) and a per-axis scale of ``scale_length`` values."""
    from onnx import TensorProto, helper, numpy_helper

    codes = np.random.default_rng(0).integers(-128, 128, shape).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["conv.weight_quantized", "conv.weight_scale"],
                              ["w"], axis=axis),
             helper.make_node("Conv", ["x", "w"], ["y"], name="/conv/Conv")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, shape[1], 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])],
        [numpy_helper.from_array(codes, "conv.weight_quantized"),
         numpy_helper.from_array(np.full(scale_length, 0.01, np.float32), "conv.weight_scale")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    path.write_bytes(model.SerializeToString())
    return path


def onnx_nested_ifs(path: Path, depth: int) -> Path:
    """An ONNX file of ``depth`` ``If`` nodes, each in the previous one's ``then`` branch."""
    from onnx import TensorProto, helper

    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Constant", [], ["y"], value_float=1.0)],
                              "leaf", [], [out])
    leaf = graph
    for level in range(depth):
        node = helper.make_node("If", ["c"], ["y"], then_branch=graph, else_branch=leaf)
        graph = helper.make_graph([node], f"g{level}", [], [out])
    graph.input.extend([helper.make_tensor_value_info("c", TensorProto.BOOL, [])])
    path.write_bytes(helper.make_model(graph).SerializeToString())
    return path


# -- Keras ------------------------------------------------------------------------------------

def keras_weights_h5(path: Path, build=None) -> Path:
    """A Keras 3 ``.weights.h5`` with one Dense layer (kernel 6 x 4, bias 4), written with h5py
    as Keras writes it; ``build(h5py.File)`` adds to it."""
    import h5py

    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.create_group("vars").attrs["name"] = "sequential"
        g = f.create_group("layers/dense/vars")
        g.attrs["name"] = "dense"
        g["0"] = rng.standard_normal((6, 4)).astype("f4")
        g["1"] = np.zeros(4, "f4")
        if build is not None:
            build(f)
    return path


def keras_zip(path: Path, members: Iterable, compression=None) -> Path:
    """A ``.keras``-like zip of ``(name, bytes)`` members (stored unless ``compression``)."""
    with zipfile.ZipFile(path, "w", compression or zipfile.ZIP_STORED) as z:
        for name, data in members:
            z.writestr(name, data)
    return path


def keras_dense_config(units: int = 4, class_name: str = "Dense") -> bytes:
    layer = {"module": "keras.layers", "class_name": class_name,
             "config": {"name": "dense", "units": units, "use_bias": True}}
    return json.dumps({"module": "keras", "class_name": "Sequential",
                       "config": {"name": "sequential", "layers": [layer]}}).encode()


#: Keras hostile inputs (:func:`keras_hostile`) and what their one line says.
KERAS_CASES = [
    ("truncated_h5", "truncated file"),
    ("corrupt_h5", "is corrupt HDF5 (Unable to get group info (bad symbol table node signature))"),
    ("unwritten", "has no data (its 1000000x1000000 values were never written)"),
    ("chunk_bomb", "would expand to 4000000000000 bytes from 0"),
    ("external_data", "keeps its data in an external file: not read"),
    ("external_link", "is a link (ExternalLink), which is not followed"),
    ("deep_groups", "groups nested more than 32 levels deep"),
    ("not_keras_h5", "is an HDF5 file but not Keras weights"),
    ("zip_dotdot", "holds a member '../model.weights.h5' that leaves the archive's folder: "
                   "refused"),
    ("zip_bomb", "zip member model.weights.h5 would expand"),
    ("zip_big_config", "its config.json declares 11534336 bytes"),
    ("truncated_keras", "is not a valid .keras zip"),
    ("contradicting_config", "has a kernel of shape 6x4, but its config says units = 5: the config "
                          "contradicts the weights"),
    ("class_contradiction", "the config says layer 'dense' is a Conv2D"),
    ("deep_config", "nested more than 64 levels deep"),
]


def keras_hostile(d: Path) -> Dict[str, Path]:
    """Hostile and broken Keras files, by case name (see ``test_keras`` / ``test_hostile``)."""
    import h5py

    d.mkdir(parents=True, exist_ok=True)
    f: Dict[str, Path] = {}
    good = keras_weights_h5(d / "good.weights.h5")
    data = good.read_bytes()
    (d / "truncated.weights.h5").write_bytes(data[: len(data) * 2 // 3])
    f["truncated_h5"] = d / "truncated.weights.h5"
    last = data.rfind(b"SNOD")  # a group's symbol table node, its signature broken
    (d / "corrupt.weights.h5").write_bytes(data[:last] + b"XXXX" + data[last + 4:])
    f["corrupt_h5"] = d / "corrupt.weights.h5"

    def unwritten(h5):  # 10^6 x 10^6 float32 declared, never written: no storage at all
        h5["layers/dense/vars"].create_dataset("2", shape=(10**6, 10**6), dtype="f4")
    f["unwritten"] = keras_weights_h5(d / "unwritten.weights.h5", unwritten)

    def bomb(h5):  # chunked + gzip, 4 TB declared, no chunk stored
        h5["layers/dense/vars"].create_dataset("2", shape=(10**6, 10**6), dtype="f4",
                                               chunks=(100, 100), compression="gzip")
    f["chunk_bomb"] = keras_weights_h5(d / "chunk_bomb.weights.h5", bomb)

    def external(h5):  # data from another file on this machine
        h5["layers/dense/vars"].create_dataset("2", shape=(8, 8), dtype="f4",
                                               external=[(str(good), 0, 256)])
    f["external_data"] = keras_weights_h5(d / "external_data.weights.h5", external)

    def link(h5):
        h5["layers/other"] = h5py.ExternalLink(str(good), "/layers/dense")
    f["external_link"] = keras_weights_h5(d / "external_link.weights.h5", link)

    def deep(h5):
        h5.create_group("layers/" + "/".join(["g"] * 40))
    f["deep_groups"] = keras_weights_h5(d / "deep_groups.weights.h5", deep)
    with h5py.File(d / "other.h5", "w") as h5:
        h5["data"] = np.zeros((3, 3))
    f["not_keras_h5"] = d / "other.h5"
    f["zip_dotdot"] = keras_zip(d / "dotdot.keras", [
        ("config.json", keras_dense_config()), ("../model.weights.h5", data),
        ("model.weights.h5", data)])
    f["zip_bomb"] = keras_zip(d / "bomb.keras", [
        ("config.json", keras_dense_config()), ("model.weights.h5", data + b"\0" * 2**26)],
        compression=zipfile.ZIP_DEFLATED)
    f["zip_big_config"] = keras_zip(d / "big_config.keras", [
        ("config.json", b" " * (11 * 2**20)), ("model.weights.h5", data)],
        compression=zipfile.ZIP_DEFLATED)
    whole = keras_zip(d / "whole.keras", [("config.json", keras_dense_config()),
                                          ("model.weights.h5", data)]).read_bytes()
    (d / "truncated.keras").write_bytes(whole[: len(whole) // 2])
    f["truncated_keras"] = d / "truncated.keras"
    f["contradicting_config"] = keras_zip(d / "contradicting.keras", [
        ("config.json", keras_dense_config(units=5)), ("model.weights.h5", data)])
    f["class_contradiction"] = keras_zip(d / "class_contradiction.keras", [
        ("config.json", keras_dense_config(class_name="Conv2D")), ("model.weights.h5", data)])
    f["deep_config"] = keras_zip(d / "deep_config.keras", [
        ("config.json", ('{"class_name": "Sequential", "config": ' + deep_json(3000) + "}")
         .encode()), ("model.weights.h5", data)])
    f["good"] = good
    return f


def keras_shard(path: Path, groups: Dict[str, Dict[str, np.ndarray]]) -> Path:
    """One shard of Keras 3 sharded weights, written with h5py as Keras writes it: ``groups``
    maps a vars group (``/layers/dense/vars``) to its datasets (``{"0": kernel}``)."""
    import h5py

    with h5py.File(path, "w") as f:
        for group, datasets in groups.items():
            g = f.require_group(group)
            g.attrs["name"] = group.split("/")[-2] or "sequential"
            for key, value in datasets.items():
                g[key] = value
    return path


def keras_shard_index(path: Path, weight_map: Dict[str, object]) -> Path:
    """A Keras 3 sharded index (``*.weights.json``) of ``weight_map``."""
    path.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return path


#: Keras sharded weights (:func:`keras_sharded_hostile`) and what their one line says.
KERAS_SHARDED_CASES = [
    ("missing_shard", "m_00002.weights.h5 (a shard named in"),
    ("shard_dotdot", "names a shard '../outside.weights.h5' outside its folder: refused"),
    ("shard_absolute", "outside.weights.h5' outside its folder: refused"),
    ("shard_symlink", "names a shard 'link.weights.h5' outside its folder: refused"),
    ("shard_fifo", "m_00001.weights.h5 is not a regular file (it is a FIFO (named pipe)) (a "
                   "shard named in"),
    ("absent_variable", "places /layers/ghost/vars in m_00000.weights.h5, which holds no "
                        "variable of it"),
    ("unplaced_variable", "m_00001.weights.h5 holds variables of /layers/extra/vars, which"),
    ("duplicate_variable", "/layers/dense/vars/1 is stored both in"),
    ("many_shards", "names more than 1000 shard files: refused"),
    ("truncated_index", "is not a valid Keras sharded weights index (Unterminated string"),
]


def keras_sharded_hostile(d: Path) -> Dict[str, Path]:
    """Hostile Keras sharded weights (an index and its shards), by case name; ``good``: one
    Dense layer whose kernel (6 x 4) is in the first shard, its bias in the second, as Keras
    splits a layer (see ``test_keras_shards`` / ``test_hostile``)."""
    rng = np.random.default_rng(0)
    kernel, bias = rng.standard_normal((6, 4)).astype("f4"), np.zeros(4, "f4")
    shards = ["m_00000.weights.h5", "m_00001.weights.h5"]
    both = {"/layers/dense/vars": shards}
    f: Dict[str, Path] = {}

    dense = "/layers/dense/vars"
    split = [{dense: {"0": kernel}}, {dense: {"1": bias}}]

    def case(name: str, weight_map, contents=split) -> Path:
        folder = d / name
        folder.mkdir(parents=True)
        for shard, groups in zip(shards, contents):
            keras_shard(folder / shard, groups)
        f[name] = keras_shard_index(folder / "m.weights.json", weight_map)
        return folder

    case("good", both)
    case("missing_shard", {"/layers/dense/vars": [shards[0], "m_00002.weights.h5"]})
    keras_shard(d / "outside.weights.h5", {"/layers/dense/vars": {"1": bias}})
    case("shard_dotdot", {"/layers/dense/vars": [shards[0], "../outside.weights.h5"]})
    case("shard_absolute", {"/layers/dense/vars": [shards[0], str(d / "outside.weights.h5")]})
    folder = case("shard_symlink", {"/layers/dense/vars": [shards[0], "link.weights.h5"]})
    (folder / "link.weights.h5").symlink_to(d / "outside.weights.h5")
    folder = case("shard_fifo", both)
    (folder / shards[1]).unlink()
    fifo(folder / shards[1])
    case("absent_variable", {**both, "/layers/ghost/vars": shards[:1]})
    case("unplaced_variable", both,
         [split[0], {dense: {"1": bias}, "/layers/extra/vars": {"0": bias}}])
    case("duplicate_variable", both, [{dense: {"0": kernel, "1": bias}}, split[1]])
    case("many_shards", {f"/layers/d{i}/vars": f"m_{i:05}.weights.h5" for i in range(1001)})
    folder = case("truncated_index", both)
    text = (folder / "m.weights.json").read_text()
    (folder / "m.weights.json").write_text(text[: len(text) // 2])
    return f
