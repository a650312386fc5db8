"""The resource and safety policy in-process: property tests of the safetensors header parser
and the archive reader on generated and mutated files (only AnalyzeError, never a hang: each
example runs under a deadline), of JSON depth and of escaping; and the policy's pieces
(memory estimate and check, settings, bounded decoding, members, JSON output) against
independent references."""
import contextlib
import gzip
import http.server
import io
import json
import math
import os
import shutil
import signal
import ssl
import struct
import subprocess
import threading
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hostile_inputs as H
from conftest import MAX_EXAMPLES

from allennlp_analyze import AnalyzeError, analyze, limits, spectrum
from allennlp_analyze.api import Analysis
from allennlp_analyze.errors import escape
from allennlp_analyze.options import AnalysisOptions
from allennlp_analyze.records import MatrixRecord, summarize
from allennlp_analyze.report import write_json
from allennlp_analyze.sources import archive, remote
from allennlp_analyze.sources.safetensors_file import SafetensorsSource
from allennlp_analyze.tensors import TensorInfo

SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


class Hung(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float = 10.0):
    """Fail (instead of hanging) if the block takes longer than ``seconds``."""
    def alarm(signum, frame):
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------------
# safetensors: generated headers and mutated files


def _read_all(path: Path):
    """Open and load every tensor: the arrays, or the AnalyzeError (anything else fails)."""
    with deadline():
        try:
            source = SafetensorsSource(path)
            return {i.name: source.load(i.name) for i in source.tensors()}, source
        except AnalyzeError as e:
            assert "\n" not in str(e)
            return None, e


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
                    | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=12)
DTYPES = st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "BOOL", "F8_E4M3", "Q4", ""])
SHAPE = st.lists(st.integers(-1, 6) | st.integers(2**31, 2**66), max_size=4) | JSON
ENTRY = st.fixed_dictionaries({"dtype": DTYPES | JSON, "shape": SHAPE,
                               "data_offsets": st.lists(st.integers(-8, 200), min_size=0,
                                                        max_size=3) | JSON})


@SETTINGS
@given(header=st.dictionaries(st.text(max_size=4), ENTRY | JSON, max_size=4),
       metadata=JSON, data_len=st.integers(0, 300))
def test_any_safetensors_header_is_read_or_refused(tmp_path, header, metadata, data_len):
    header = dict(header, __metadata__=metadata)
    path = tmp_path / "h.safetensors"
    raw = json.dumps(header, allow_nan=True).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data_len))
    arrays, source = _read_all(path)
    if arrays is not None:  # accepted: every tensor is what its header says, inside the file
        for info in source.tensors():
            assert arrays[info.name].shape == info.shape
            assert header[info.name]["data_offsets"][1] <= data_len


def _valid_safetensors() -> bytes:
    rng = np.random.default_rng(0)
    tensors = {"a.weight": rng.standard_normal((4, 3)), "b.weight": rng.standard_normal((2, 5)),
               "c.bias": rng.standard_normal(3)}
    header, chunks, offset = {}, [], 0
    for name, array in tensors.items():
        data = array.astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    return H.safetensors_bytes(header, b"".join(chunks))


VALID_ST = _valid_safetensors()
MUTATIONS = st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert"]), st.integers(0, 10**6),
                               st.binary(min_size=1, max_size=4)), min_size=1, max_size=4)


def _mutate(data: bytes, mutations) -> bytes:
    data = bytearray(data)
    for kind, where, blob in mutations:
        i = where % (len(data) + 1)
        if kind == "flip" and i < len(data):
            data[i] ^= blob[0] or 1
        elif kind == "cut":
            del data[i:]
        elif kind == "insert":
            data[i:i] = blob
    return bytes(data)


@SETTINGS
@given(mutations=MUTATIONS)
def test_mutated_safetensors_is_read_or_refused(tmp_path, mutations):
    path = tmp_path / "m.safetensors"
    path.write_bytes(_mutate(VALID_ST, mutations))
    arrays, source = _read_all(path)
    if arrays is not None:
        assert all(arrays[i.name].shape == i.shape for i in source.tensors())


# ---------------------------------------------------------------------------------------------
# archives: mutated tar streams and gzip bytes, read as both front-ends read them


def _valid_tar() -> bytes:
    weights = H.torch_bytes({"w": torch.ones(3, 2)})
    return H.tar_bytes([("config.json", b'{"model": {}}'), ("vocabulary/tokens.txt", b"a\nb\n"),
                        ("weights.th", weights)])


VALID_TAR = _valid_tar()


def _scan_both(path: Path, dest: Path):
    """scan_archive as the standalone (weights in memory) and as the plugin (extraction)."""
    outcomes = []
    for kwargs in ({}, {"extract_to": dest}):
        with deadline():
            try:
                found = archive.scan_archive(path, **kwargs)
            except AnalyzeError as e:
                assert "\n" not in str(e)
                outcomes.append(str(e))
                continue
        outcomes.append(found)
    return outcomes


def _check_extraction(found, dest: Path):
    if found.folder is None:
        return
    for p in dest.rglob("*"):  # only regular files and folders, all inside dest
        assert p.is_dir() or p.is_file() and not p.is_symlink()
        assert dest.resolve() in p.resolve().parents


@SETTINGS
@given(mutations=MUTATIONS)
def test_mutated_tar_is_read_or_refused_alike(tmp_path_factory, mutations):
    tmp = tmp_path_factory.mktemp("tar")
    path = tmp / "m.tar.gz"
    path.write_bytes(gzip.compress(_mutate(VALID_TAR, mutations)))
    standalone, plugin = _scan_both(path, tmp / "x")
    # both front-ends: the same verdict, the same weights member
    if isinstance(standalone, str) or isinstance(plugin, str):
        assert standalone == plugin
    else:
        assert standalone.weights == plugin.weights
        _check_extraction(plugin, tmp / "x")


@SETTINGS
@given(mutations=MUTATIONS)
def test_mutated_gzip_is_read_or_refused(tmp_path_factory, mutations):
    tmp = tmp_path_factory.mktemp("gz")
    path = tmp / "m.tar.gz"
    path.write_bytes(_mutate(gzip.compress(VALID_TAR), mutations))
    standalone, plugin = _scan_both(path, tmp / "x")
    if isinstance(standalone, str) or isinstance(plugin, str):
        assert standalone == plugin
    else:
        _check_extraction(plugin, tmp / "x")


def test_member_count_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_ARCHIVE_MEMBERS", 5)
    path = H.tar_gz(tmp_path / "m.tar.gz", [(f"f{i}", b"x") for i in range(6)])
    with pytest.raises(AnalyzeError, match="holds more than 5 members"):
        archive.scan_archive(path)


def test_declared_member_beyond_the_expansion_limit(tmp_path, monkeypatch):
    """The limit is ratio x compressed size + allowance; a member declaring more is refused
    before a byte of it is read."""
    monkeypatch.setenv(limits.ENV_MAX_EXPANSION, "3")
    monkeypatch.setattr(limits, "EXPANSION_ALLOWANCE", 20000)
    data = os.urandom(3000)  # incompressible: the archive is ~4 KB
    path = H.tar_gz(tmp_path / "ok.tar.gz", [("weights.th", H.torch_bytes({"w": torch.ones(2)})),
                                             ("blob", data)])
    archive.scan_archive(path)  # under the limit: fine
    size = path.stat().st_size
    assert limits.expanded_limit(size) == 3 * size + 20000
    bomb = tmp_path / "bomb.tar.gz"
    bomb.write_bytes(gzip.compress(H.member_bytes("weights.th", b"", 20000 + 10 * size)))
    with pytest.raises(AnalyzeError, match="decompresses to more than"):
        archive.scan_archive(bomb)


# ---------------------------------------------------------------------------------------------
# JSON depth, escaping, JSON output


def _depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


NESTED = st.recursive(st.integers() | st.text(max_size=3),
                      lambda inner: st.lists(inner, max_size=2)
                      | st.dictionaries(st.text(max_size=2), inner, max_size=2), max_leaves=8)


@SETTINGS
@given(value=NESTED, extra=st.integers(0, 80))
def test_json_depth_limit(value, extra):
    doc = value
    for _ in range(extra):
        doc = [doc]
    text = json.dumps(doc)
    if _depth(doc) <= limits.MAX_JSON_DEPTH:
        assert limits.parse_json(text) == json.loads(text)
    else:
        with pytest.raises(ValueError, match="nested more than 64 levels deep"):
            limits.parse_json(text)


def test_json_constants_and_extreme_depth():
    for text in ("[NaN]", '{"a": Infinity}', "-Infinity"):
        with pytest.raises(ValueError, match="is not a JSON number"):
            limits.parse_json(text)
    with pytest.raises(ValueError, match="nested more than"):
        limits.parse_json("[" * 10**6 + "]" * 10**6)  # far past the interpreter's recursion limit


@SETTINGS
@given(text=st.text())
def test_escape_prints_one_harmless_line(text):
    out = escape(text)
    assert not any(ord(c) < 32 or 0x7f <= ord(c) <= 0x9f or 0xd800 <= ord(c) <= 0xdfff
                   or c in "\u2028\u2029\u202a\u202b\u202c\u202d\u202e" for c in out)
    out.encode("utf-8")  # always writable to a strict UTF-8 stream
    safe = all(c.isprintable() or c == " " for c in text)
    if safe:
        assert out == text


def test_escape_examples():
    assert escape("a\nb\tc\r") == "a\\nb\\tc\\r"
    assert escape("\x1b[2J\x00\x7f\x9b") == "\\x1b[2J\\x00\\x7f\\x9b"
    assert escape("x\u202ey\u2028") == "x\\u202ey\\u2028"
    assert escape(os.fsdecode(b"bad\xff")) == "bad\\udcff"
    assert escape("näme ✓ \\n") == "näme ✓ \\n"


def test_json_report_never_holds_nan_or_infinity():
    rec = MatrixRecord(model="m", name="w", module_type=None, shape=(4, 2), dtype="float32",
                       N=4, M=2, Q=2.0, sv_max=1.0, sv_min=0.5, log10_sv_min=math.log10(0.5),
                       alpha=float("inf"), D=float("nan"))
    result = Analysis(records=[rec], summary=summarize([rec], Counter(), ["m"], []),
                      options=AnalysisOptions())
    out = io.StringIO()
    write_json(result, out)

    def refuse(name):
        raise AssertionError(f"{name} in the JSON")

    doc = json.loads(out.getvalue(), parse_constant=refuse)
    assert doc["records"][0]["alpha"] is None and doc["records"][0]["D"] is None
    assert doc["summary"]["alpha_mean"] is None


# ---------------------------------------------------------------------------------------------
# memory


def test_analysis_memory_formula():
    # wide Gram side (Q < 2: 2 M^2 > N M) and tall (Q > 2), by hand
    assert limits.analysis_memory(300, 200) == 8 * 300 * 200 + 8 * 2 * 200 * 200
    assert limits.analysis_memory(1000, 100) == 8 * 1000 * 100 * 2
    assert limits.analysis_memory(100, 1000) == limits.analysis_memory(1000, 100)
    # several row blocks: streamed, the Gram matrix and the SVD fallback's blocked QR, whatever N
    B = spectrum.BLOCK_ROWS
    assert limits.analysis_memory(30000, 20000) == 8 * (5 * 20000**2 + 2 * B * 20000)
    assert limits.analysis_memory(128256, 4096) == limits.analysis_memory(10 * B, 4096)


class _NoReads:
    """A source with one big matrix whose data must never be read."""

    label = "big"

    def tensors(self):
        return [TensorInfo("huge.weight", (30000, 20000), "float32", "Linear"),
                TensorInfo("ok.weight", (30, 20), "float32", "Linear")]

    def load(self, name):
        raise AssertionError(f"{name} was read")


def test_memory_is_checked_before_anything_is_read(monkeypatch):
    monkeypatch.setenv(limits.ENV_MAX_MEMORY, "2G")
    assert limits.available_memory() == (2 * 2**30, limits.ENV_MAX_MEMORY)
    need = limits.analysis_memory(30000, 20000)  # streamed: test_analysis_memory_formula
    with pytest.raises(AnalyzeError) as e:
        analyze(_NoReads())
    assert str(e.value) == (f"big: huge.weight (30000 x 20000) needs {need / 2**30:.1f} GiB of "
                            "memory, more than the 2.0 GiB that ALLENNLP_ANALYZE_MAX_MEMORY "
                            "leaves (leave it out with --exclude, or set "
                            "ALLENNLP_ANALYZE_MAX_MEMORY)")
    # left out, the rest is analyzed (and only what is analyzed is read)
    with pytest.raises(AssertionError, match="ok.weight was read"):
        analyze(_NoReads(), exclude=["huge"])


def test_available_memory_is_the_least_of_the_limits(monkeypatch):
    monkeypatch.delenv(limits.ENV_MAX_MEMORY, raising=False)
    available, source = limits.available_memory()
    with open("/proc/meminfo") as f:
        meminfo = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    assert available is not None and available <= meminfo * 1.05 + 2**28
    assert source


@pytest.mark.parametrize("text, value", [("1", 1), ("2k", 2048), ("1.5G", 3 * 2**29),
                                         ("3MiB", 3 * 2**20), ("0", None), ("-1", None),
                                         ("lots", None), ("1e3", None)])
def test_parse_bytes(text, value):
    assert limits.parse_bytes(text) == value


@pytest.mark.parametrize("name, value", [(limits.ENV_READ_TIMEOUT, "0"),
                                         (limits.ENV_CONNECT_TIMEOUT, "inf"),
                                         (limits.ENV_MAX_EXPANSION, "-2"),
                                         (limits.ENV_MAX_DOWNLOAD, "big")])
def test_bad_settings_are_one_error(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    getter = {limits.ENV_READ_TIMEOUT: limits.read_timeout,
              limits.ENV_CONNECT_TIMEOUT: limits.connect_timeout,
              limits.ENV_MAX_EXPANSION: limits.max_expansion,
              limits.ENV_MAX_DOWNLOAD: limits.max_download}[name]
    with pytest.raises(AnalyzeError, match=f"^{name} must be"):
        getter()


# ---------------------------------------------------------------------------------------------
# files and decoding


def test_open_regular_does_not_block_on_a_fifo(tmp_path):
    fifo = H.fifo(tmp_path / "p")
    with deadline(5):
        with pytest.raises(AnalyzeError, match=r"is not a regular file \(it is a FIFO"):
            limits.open_regular(fifo)
        with pytest.raises(AnalyzeError, match="a character device"):
            limits.read_regular("/dev/zero")
    (tmp_path / "f").write_bytes(b"abc")
    assert limits.read_regular(tmp_path / "f") == b"abc"
    with pytest.raises(AnalyzeError, match="is larger than"):
        limits.read_regular(tmp_path / "f", max_bytes=2)


@pytest.mark.parametrize("encoding, encode", [
    ("gzip", lambda b: gzip.compress(b[:5000]) + gzip.compress(b[5000:])),  # two members
    ("deflate", zlib.compress)])
def test_content_encoding_is_decoded_like_the_reference(tmp_path, encoding, encode):
    body = os.urandom(3000) + b"\0" * 2**21 + os.urandom(3000)
    path = tmp_path / "model.safetensors"
    path.write_bytes(encode(body))
    remote._decode("u", path, encoding, cap=2**30)
    assert path.read_bytes() == body


def test_content_encoding_bomb_and_gz_label(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(H.zeros_gzip(2**30))
    with pytest.raises(AnalyzeError, match="decodes .gzip. to more than"):
        remote._decode("u", path, "gzip", cap=2**30)
    # a .tar.gz whose gzip is mistaken for a transfer encoding: kept as sent
    label = tmp_path / "model.tar.gz"
    raw = gzip.compress(H.tar_bytes([("weights.th", b"x")]))
    label.write_bytes(raw)
    remote._decode("u", label, "gzip", cap=2**30)
    assert label.read_bytes() == raw
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(gzip.compress(os.urandom(5000))[:-20])
    with pytest.raises(AnalyzeError, match="truncated"):
        remote._decode("u", truncated, "gzip", cap=2**30)


def test_failed_downloads_leave_nothing(tmp_path):
    """A refused download (here an unusable file) removes its temporary folder and its cache
    folder; nothing is cached."""
    server = H.HostileServer(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not weights at all")
    try:
        with pytest.raises(AnalyzeError, match="is not usable.*it was not cached"):
            remote.fetch(f"{server.base}/file/model.safetensors", tmp_path / "cache")
    finally:
        server.close()
    assert list((tmp_path / "cache").iterdir()) == []


def test_tar_members_of_a_stream_are_not_kept(tmp_path):
    """The archive reader holds no member list (memory flat in the member count): only the
    names, for the ambiguity rule."""
    path = H.tar_gz(tmp_path / "m.tar.gz", [("weights.th", H.torch_bytes({"w": torch.ones(2)})),
                                            *((f"f{i}", b"") for i in range(2000))])
    seen = []
    real = archive._Scan.member

    def spy(self, tar, member):
        real(self, tar, member)
        seen.append(len(tar.members))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(archive._Scan, "member", spy)
        archive.scan_archive(path)
    assert len(seen) == 2001 and max(seen) <= 1


def test_figure_names_of_many_twins_in_linear_time():
    """Figure file names stay unique and as before (the smallest free "-k"), without searching
    from k = 2 for every twin: 100000 names that sanitize alike."""
    from allennlp_analyze.plots import figure_names, sanitize

    def reference(names):  # the plain search, on a small input
        seen, out = set(), []
        for n in names:
            base, name, k = sanitize(n), sanitize(n), 2
            while name.lower() in seen:
                name, k = f"{base}-{k}", k + 1
            seen.add(name.lower())
            out.append(name + ".png")
        return out

    def records(names):
        return [MatrixRecord(model="m", name=n, module_type=None, shape=(3, 2), dtype="float32",
                             N=3, M=2, Q=1.5) for n in names]

    small = ["a", "a-2", "a", "A", "a-3", "a", "层", "層", "a.b", "a_b", "a", "a-5"]
    assert figure_names(records(small), False) == reference(small)
    with deadline(20):
        names = figure_names(records(["层"] * 100_000), False)
    assert len(set(names)) == 100_000 and names[-1] == "matrix-100000.png"


def test_https_through_the_watched_connection(tmp_path, monkeypatch):
    """https goes through the same watched connection: a self-signed certificate is one error
    line; once trusted (SSL_CERT_FILE), the download works."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl to make a certificate")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem"),
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "model.safetensors").write_bytes(VALID_ST)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path / "www"), **kwargs)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{httpd.server_address[1]}/model.safetensors"
    try:
        with deadline(30):
            with pytest.raises(AnalyzeError, match="CERTIFICATE_VERIFY_FAILED") as e:
                remote.open_url(url, tmp_path / "cache")
            assert "\n" not in str(e.value)
            monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "cert.pem"))
            source = remote.open_url(url, tmp_path / "cache")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert [i.name for i in source.tensors()] == ["a.weight", "b.weight", "c.bias"]
