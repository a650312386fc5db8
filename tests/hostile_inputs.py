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
