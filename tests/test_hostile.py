"""Hostile and broken inputs through both front-ends (``allennlp-analyze`` and ``allennlp
analyze``): no traceback, no hang, no wrong answer, nothing bad left in the cache.

Every case runs as the command would run it, in one process per front-end
(``hostile_runner.py``: the AllenNLP one takes seconds to start), under a memory limit
(``RLIMIT_AS``) and a deadline per case; the two processes run side by side, against inputs
generated here and misbehaving HTTP servers on 127.0.0.1 (``hostile_inputs``). Signals (Ctrl-C,
SIGTERM during a download) need processes of their own.
"""
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

import hostile_inputs as H

pytest.importorskip("allennlp")
import torch  # noqa: E402

from allennlp_analyze import spectrum  # noqa: E402
from allennlp_analyze.sources import remote  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TAGGER = REPO / "fixtures" / "archives" / "tagger_lstm.tar.gz"
ALLENNLP = Path(sys.executable).parent / "allennlp"
RUNNER = Path(__file__).with_name("hostile_runner.py")
#: Address space of each front-end's process: the standalone one imports numpy (and torch for
#: .th files: ~3.3 GB of address space, little of it memory), the plugin AllenNLP (~4 GB).
MEMORY = {"standalone": 5 * 2**30, "plugin": 6 * 2**30}
TIMEOUT = 400
#: A test-sized network policy: give up on a silent or dripping server after 1 s.
FAST_NET = {"ALLENNLP_ANALYZE_READ_TIMEOUT": "1", "ALLENNLP_ANALYZE_CONNECT_TIMEOUT": "1"}
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\ud800-\udfff]")


def _members(archive: Path) -> dict:
    with tarfile.open(archive, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Every local hostile input, by name."""
    d = tmp_path_factory.mktemp("hostile")
    tagger = _members(TAGGER)
    config, weights = tagger["config.json"], tagger["weights.th"]
    small = H.torch_bytes({"fc.weight": torch.randn(30, 10, generator=torch.Generator().manual_seed(0))})
    rng0 = np.random.default_rng(0)
    doubled = H.torch_bytes({"fc.weight": 2 * torch.load(__import__("io").BytesIO(small),
                                                         weights_only=True)["fc.weight"]})
    f = {}
    f["fifo.th"] = H.fifo(d / "fifo.th")
    f["fifo.safetensors"] = H.fifo(d / "fifo.safetensors")
    f["fifo.tar.gz"] = H.fifo(d / "fifo.tar.gz")
    f["fifo"] = H.fifo(d / "fifo")
    for name in ("zero.th", "zero.tar.gz", "zero.safetensors", "zero"):
        (d / name).symlink_to("/dev/zero")
        f[name] = d / name
    good = H.tar_gz(d / "good.tar.gz", [("config.json", config), ("weights.th", weights)])
    data = good.read_bytes()
    (d / "truncated.tar.gz").write_bytes(data[: len(data) * 2 // 3])
    bad_crc = bytearray(data)
    bad_crc[-8] ^= 0xFF  # the gzip trailer's CRC32
    (d / "bad_crc.tar.gz").write_bytes(bytes(bad_crc))
    f.update(good=good, truncated=d / "truncated.tar.gz", bad_crc=d / "bad_crc.tar.gz")
    f["two_weights"] = H.tar_gz(d / "two_weights.tar.gz", [("config.json", config),
                                                          ("weights.th", small), ("weights.th", doubled)])
    f["dot_twin"] = H.tar_gz(d / "dot_twin.tar.gz", [("weights.th", small), ("./weights.th", doubled)])
    f["nested_weights"] = H.tar_gz(d / "nested_weights.tar.gz", [
        ("config.json", config), ("weights.th", small), ("model/weights.th", doubled)])
    f["symlink_weights"] = H.tar_gz(d / "symlink_weights.tar.gz", [
        ("config.json", config), ("other.th", small), H.link("weights.th", "other.th")])
    f["hardlink_weights"] = H.tar_gz(d / "hardlink_weights.tar.gz", [
        ("config.json", config), ("other.th", small),
        H.link("weights.th", "other.th", tarfile.LNKTYPE)])
    f["fifo_weights"] = H.tar_gz(d / "fifo_weights.tar.gz", [
        ("config.json", config), H.special("weights.th", tarfile.FIFOTYPE)])
    f["device_weights"] = H.tar_gz(d / "device_weights.tar.gz", [
        ("config.json", config), H.special("best.th", tarfile.CHRTYPE)])
    f["bomb_member"] = H.bomb_archive(d / "bomb_member.tar.gz", True, weights, config)
    f["bomb_tail"] = H.bomb_archive(d / "bomb_tail.tar.gz", False, weights, config)
    f["many"] = H.tar_gz(d / "many.tar.gz", [
        *tagger.items(), *((f"junk/{i}.txt", b"abc") for i in range(20000))])
    f["many_vocab"] = H.tar_gz(d / "many_vocab.tar.gz", [
        *tagger.items(), *((f"vocabulary/ns{i}.txt", b"a\n") for i in range(1100))])
    f["deep_config"] = H.tar_gz(d / "deep_config.tar.gz", [
        *((n, v) for n, v in tagger.items() if n != "config.json"),
        ("config.json", ('{"model": ' + H.deep_json(3000) + "}").encode())])
    f["deep_header"] = d / "deep.safetensors"
    f["deep_header"].write_bytes(H.safetensors_bytes(H.deep_json(3000).encode()))
    (d / "deep").mkdir()
    f["deep_index"] = d / "deep" / "model.safetensors.index.json"
    f["deep_index"].write_text('{"weight_map": ' + H.deep_json(3000) + "}")
    f["shape_float"] = d / "shape_float.safetensors"
    f["shape_float"].write_bytes(H.safetensors_bytes(
        {"w": {"dtype": "F32", "shape": [1e30], "data_offsets": [0, 0]}}))
    f["shape_huge"] = d / "shape_huge.safetensors"
    f["shape_huge"].write_bytes(H.safetensors_bytes(
        b'{"w": {"dtype": "F32", "shape": [1000000000000000000000000000000], "data_offsets": [0, 4]}}',
        b"\0" * 4))
    f["shape_overflow"] = d / "shape_overflow.safetensors"  # 2**32 * 2**32 wraps to 0 in int64
    f["shape_overflow"].write_bytes(H.safetensors_bytes(
        {"w": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}}))
    f["empty_conv"] = d / "empty_conv.safetensors"  # 0 x 64 x 10**12: no data, no positions
    f["empty_conv"].write_bytes(H.safetensors_bytes(
        {"w": {"dtype": "F32", "shape": [0, 64, 10**12], "data_offsets": [0, 0]},
         "v": {"dtype": "F32", "shape": [4, 3], "data_offsets": [0, 48]}},
        np.random.default_rng(1).standard_normal(12).astype("<f4").tobytes()))
    # ONNX: truncated protobuf, external data past the end or outside the folder, absurd dims,
    # subgraphs nested past our limit and past protobuf's
    onnx_good = H.onnx_matmul_model({"w": rng0.standard_normal((64, 32))}).SerializeToString()
    f["onnx_truncated"] = d / "truncated.onnx"
    f["onnx_truncated"].write_bytes(onnx_good[: len(onnx_good) // 2])
    (d / "outside.bin").write_bytes(b"\0" * 48)
    f["onnx_past_end"] = H.onnx_external(d / "onnx_past", {"w": np.ones((4, 3))}, offset=10**9)
    f["onnx_escape"] = H.onnx_external(d / "onnx_escape", {"w": np.ones((4, 3))},
                                       location="../outside.bin")
    f["onnx_symlink"] = H.onnx_external(d / "onnx_symlink", {"w": np.ones((4, 3))},
                                        location="link.bin")
    (d / "onnx_symlink" / "link.bin").symlink_to(d / "outside.bin")
    f["onnx_absurd"] = H.onnx_absurd_dims(d / "absurd.onnx")
    f["onnx_deep"] = H.onnx_nested_ifs(d / "deep.onnx", 20)
    f["onnx_deeper"] = H.onnx_nested_ifs(d / "deeper.onnx", 32)
    # ONNX sparse initializers and QDQ convolution kernels that break ONNX's rules or our memory
    f["onnx_sparse_range"] = H.onnx_sparse(d / "sparse_range.onnx", [4, 3], [2, 12], [1, 2])
    f["onnx_sparse_count"] = H.onnx_sparse(d / "sparse_count.onnx", [4, 3], [2, 5], [1, 2, 3])
    f["onnx_sparse_absurd"] = H.onnx_sparse(d / "sparse_absurd.onnx", [10**7, 10**7],
                                            [[0, 1], [9999999, 9999999]], [1, 2])
    f["onnx_qdq_scale"] = H.onnx_qdq_conv(d / "qdq_scale.onnx", (8, 6, 3, 3), 6)
    f["onnx_ok"] = d / "ok.onnx"
    f["onnx_ok"].write_bytes(onnx_good)
    f["ts_missing"] = H.torchscript_archive(d / "ts_missing.pt", drop="data/1")
    f["ts_lying"] = H.torchscript_archive(d / "ts_lying.pt", cut="data/0")
    f["sparse"] = H.sparse_safetensors(d / "sparse.safetensors", 40000, 20000)
    gptq = {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32,
                                    "sym": True, "checkpoint_format": "gptq"}}
    layer, p = H.gptq_layer(), "model.layers.0.mlp.up_proj"
    ct_layer = {"l.weight_packed": np.zeros((8, 5), np.int32),
                "l.weight_scale": np.ones((8, 2), np.float16),
                "l.weight_shape": np.array([8, 64], np.int64)}
    for name, (tensors, config) in {
            "bits": (layer, {"quantization_config": dict(gptq["quantization_config"], bits=8)}),
            "scales": ({**layer, f"{p}.scales": layer[f"{p}.scales"][:, :32]}, gptq),
            "g_idx": ({**layer, f"{p}.g_idx": layer[f"{p}.g_idx"] + 3}, gptq),
            "width": (ct_layer, None),
            "marlin": (layer, {"quantization_config": dict(gptq["quantization_config"],
                                                           checkpoint_format="marlin")}),
            "3bit": ({**layer, f"{p}.qzeros": np.zeros((4, 6), np.int32)}, None)}.items():
        f[f"packed_{name}"] = H.packed_folder(d / f"packed_{name}", tensors, config)
    good_gguf = H.gguf_bytes()
    for name, data in {
            "count": H.gguf_bytes(n_tensors=2**62),
            "offset": H.gguf_bytes([("w.weight", (64, 8), 0, 2**40)]),
            "shape": H.gguf_bytes([("w.weight", (2**32, 2**32), 0, 0)], data=b""),
            "truncated": good_gguf[:len(good_gguf) - 100],
            "string": H.gguf_bytes(kv=H.gguf_string("k", 2**63) + b"\0" * 16, n_kv=1)}.items():
        f[f"gguf_{name}"] = d / f"{name}.gguf"
        f[f"gguf_{name}"].write_bytes(data)
    f["tiny"] = H.tiny_matrices(d / "tiny.safetensors", 100_000)
    names = ["plain.weight", "new\nline.weight", "esc\x1b[2J\x1b[31m.weight", "rtl\u202eexe.weight"]
    rng = np.random.default_rng(0)
    f["names"] = H.safetensors_file(d / "names.safetensors",
                                   {n: rng.standard_normal((12, 4)) for n in names})
    f["names_list"] = names
    weird = os.fsdecode(os.path.join(os.fsencode(d), b"bad\xff\x1b[31mname.safetensors"))
    H.safetensors_file(Path(weird), {"w": rng.standard_normal((12, 4))})
    f["weird_name"] = weird
    f["binary_list"] = d / "list.bin"
    f["binary_list"].write_bytes(bytes(range(256)) * 4)
    f["nul_list"] = d / "nul.txt"
    f["nul_list"].write_text(f"{good}\x00x\n")
    f["st"] = H.safetensors_file(d / "st.safetensors", {"fc.weight": rng.standard_normal((30, 10))})
    f.update({f"keras:{name}": path for name, path in H.keras_hostile(d / "keras").items()})
    f.update({f"keras_sharded:{name}": path
              for name, path in H.keras_sharded_hostile(d / "keras_sharded").items()})
    lora = {"base_model.model.fc.lora_A.weight": rng.standard_normal((4, 10)),
            "base_model.model.fc.lora_B.weight": rng.standard_normal((30, 4))}
    f["lora_lying_r"] = H.lora_adapter(d / "lora_lying_r", {"r": 8}, lora)
    f["lora_absent"] = H.lora_adapter(d / "lora_absent", {}, {
        k.replace(".fc.", ".gc."): v for k, v in lora.items()})
    f["www"] = d / "www"
    f["www"].mkdir()
    for name in ("tagger.tar.gz", "model.tar.gz"):
        (f["www"] / name).write_bytes(TAGGER.read_bytes())
    (f["www"] / "model.safetensors").write_bytes(f["st"].read_bytes())
    return f


def _cases(f, base, backlog, work):
    """(name, argv, env, stdout) of every case; expectations are in the tests below."""
    st, good = str(f["st"]), str(f["good"])
    c = ["--cache-dir", str(work / "cache")]
    return {
        # special files: refused before any read
        **{f"special:{n}": ([str(f[n])], {}) for n in (
            "fifo.th", "fifo.safetensors", "fifo.tar.gz", "fifo",
            "zero.th", "zero.tar.gz", "zero.safetensors", "zero")},
        "sources_from_fifo": ([st, "--sources-from", str(f["fifo"])], {}),
        "sources_from_zero": (["--sources-from", str(f["zero"])], {}),
        "sources_from_binary": (["--sources-from", str(f["binary_list"])], {}),
        "sources_from_nul": (["--sources-from", str(f["nul_list"])], {}),
        "weights_file_fifo": ([good, "--weights-file", str(f["fifo.th"])], {}),
        # archives: broken, ambiguous, bombs, huge
        **{f"archive:{n}": ([str(f[n])], {}) for n in (
            "truncated", "bad_crc", "two_weights", "dot_twin", "nested_weights",
            "symlink_weights", "hardlink_weights", "fifo_weights", "device_weights",
            "bomb_member", "bomb_tail")},
        "many": ([str(f["many"]), "--format", "json"], {}),
        "many_vocab": ([str(f["many_vocab"]), "--format", "json"], {}),
        "deep_config": ([str(f["deep_config"]), "--format", "json"], {}),
        # safetensors and JSON
        **{f"header:{n}": ([str(f[n])], {}) for n in (
            "deep_header", "deep_index", "shape_float", "shape_huge", "shape_overflow")},
        **{f"onnx:{n}": ([str(f[f"onnx_{n}"]), "--min-q", "1"], {}) for n in (
            "truncated", "past_end", "escape", "symlink", "absurd", "deep", "deeper",
            "sparse_range", "sparse_count", "sparse_absurd")},
        "onnx:qdq_scale": ([str(f["onnx_qdq_scale"]), "--include", "conv", "--conv-min-dim", "1",
                            "--min-q", "1"], {}),
        "onnx:ok": ([str(f["onnx_ok"]), "--format", "json"], {}),
        **{f"packed:{n}": ([str(f[f"packed_{n}"])], {}) for n in (
            "bits", "scales", "g_idx", "width", "marlin", "3bit")},
        **{f"gguf:{n}": ([str(f[f"gguf_{n}"])], {}) for n in (
            "count", "offset", "shape", "truncated", "string")},
        **{f"torchscript:{n}": ([str(f[n])], {}) for n in ("ts_missing", "ts_lying")},
        "empty_conv": ([str(f["empty_conv"]), "--include", "conv", "--format", "json"], {}),
        "sparse": ([str(f["sparse"])], {}),
        "tiny": ([str(f["tiny"]), "--match", r"^m77777\.weight$", "--format", "json"], {}),
        # LoRA adapters whose adapter_config.json lies
        "lora_lying_r": ([str(f["lora_lying_r"])], {}),
        "lora_absent": ([str(f["lora_absent"]), "--base", st], {}),
        # options
        **{f"option:{' '.join(o)}": ([st, *o], {}) for o in (
            ["--min-q", "inf"], ["--loose-tol", "inf"], ["--min-q", "nan"],
            ["--log10-threshold", "nan", "--format", "json"], ["--loose-tol", "1e309"],
            ["--device", "meta"], ["--device", "mps"], ["--workers", "100000"],
            ["--include-package", "no_such_module"])},
        "env:bad_timeout": ([f"{base}/file/model.safetensors", *c],
                            {"ALLENNLP_ANALYZE_READ_TIMEOUT": "soon"}),
        # messages: names from the input, escaped
        "names_table": ([str(f["names"]), "--min-q", "1"], {}),
        "names_csv": ([str(f["names"]), "--min-q", "1", "--format", "csv"], {}),
        "names_json": ([str(f["names"]), "--min-q", "1", "--format", "json"], {}),
        "missing_name": ([str(Path(f["st"]).parent / "miss\ning\x1b[2J.th")], {}),
        "weird_name": ([f["weird_name"], st, "--min-q", "1"], {}, str(work / "weird.out")),
        "full_disk": ([st], {}, "/dev/full"),
        # downloads (FAST_NET: 1 s timeouts)
        "net:silent": ([f"{base}/silent/model.safetensors", *c], FAST_NET),
        "net:drip_headers": ([f"{base}/drip-headers/model.safetensors", *c], FAST_NET),
        "net:drip_body": ([f"{base}/drip-body/model.safetensors", *c], FAST_NET),
        "net:connect": ([backlog, *c], FAST_NET),
        "net:html": ([f"{base}/html/model.tar.gz", *c], FAST_NET),
        "net:no_length": ([f"{base}/no-length/model.tar.gz", *c], FAST_NET),
        "net:loop": ([f"{base}/loop/model.tar.gz", *c], FAST_NET),
        "net:br": ([f"{base}/br-encoded/model.safetensors", *c], FAST_NET),
        "net:gzip_bomb": ([f"{base}/gzip-bomb/model.safetensors", *c],
                          dict(FAST_NET, ALLENNLP_ANALYZE_MAX_EXPANSION="2")),
        "net:endless": ([f"{base}/endless/model.safetensors", *c],
                        dict(FAST_NET, ALLENNLP_ANALYZE_MAX_DOWNLOAD="8M")),
        "net:huge_length": ([f"{base}/huge-length/model.safetensors", *c],
                            dict(FAST_NET, ALLENNLP_ANALYZE_MAX_DOWNLOAD="1G")),
        "net:gzip_label": ([f"{base}/gzip-label/tagger.tar.gz", *c, "--format", "json"], FAST_NET),
        "net:gzip_encoded": ([f"{base}/gzip-encoded/model.safetensors", *c, "--format", "json"],
                             FAST_NET),
        "net:deflate_encoded": ([f"{base}/deflate-encoded/model.tar.gz", *c, "--format", "json"],
                                FAST_NET),
        "net:ok": ([f"{base}/file/model.tar.gz", *c, "--format", "json"], FAST_NET),
        # Keras files (h5py only): lying HDF5, zip tricks, configs contradicting the weights
        **{f"keras:{n}": ([str(f[f"keras:{n}"])], {}) for n, _ in H.KERAS_CASES},
        "keras:good": ([str(f["keras:good"]), "--min-q", "1", "--format", "json"], {}),
        **{f"keras_sharded:{n}": ([str(f[f"keras_sharded:{n}"])], {})
           for n, _ in H.KERAS_SHARDED_CASES},
        "keras_sharded:good": ([str(f["keras_sharded:good"].parent), "--min-q", "1",
                                "--format", "json"], {}),
        "net:ok_again": ([f"{base}/file/model.tar.gz", *c, "--format", "json"], FAST_NET),
        "net:html_again": ([f"{base}/html/model.tar.gz", *c], FAST_NET),
    }


def _limit_memory(nbytes: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (nbytes, nbytes))
    return apply


@pytest.fixture(scope="module")
def batches(inputs, tmp_path_factory):
    """Both front-ends over every case, side by side: ``{front: {case: result}}``."""
    tmp = tmp_path_factory.mktemp("batches")
    server = H.HostileServer(inputs["www"])
    procs, paths = {}, {}
    try:
        for front in ("standalone", "plugin"):
            work = tmp / front
            (work / "tmp").mkdir(parents=True)
            cases = _cases(inputs, server.base, server.full_backlog, work)
            spec = [{"argv": argv, "env": env, "stdout": rest[0] if rest else None}
                    for argv, env, *rest in cases.values()]
            (work / "cases.json").write_text(json.dumps(spec))
            env = dict(os.environ, TMPDIR=str(work / "tmp"), PYTHONPATH=str(REPO),
                       HOME=str(work), ALLENNLP_CACHE_ROOT=str(work / "allennlp"),
                       PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
            for key in [k for k in env if k.startswith("ALLENNLP_ANALYZE_")]:
                env.pop(key)
            procs[front] = subprocess.Popen(
                [sys.executable, str(RUNNER), front, str(work / "cases.json"),
                 str(work / "results.json")], env=env, cwd=str(work),
                preexec_fn=_limit_memory(MEMORY[front]), stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True)
            paths[front] = (work, list(cases))
        results = {}
        for front, proc in procs.items():
            out, _ = proc.communicate(timeout=TIMEOUT)
            work, names = paths[front]
            assert proc.returncode == 0, out
            results[front] = dict(zip(names, json.loads((work / "results.json").read_text())))
            results[front]["_work"] = work
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        server.close()
    results["_log"] = list(server.routes.log)
    return results


FRONTS = ("standalone", "plugin")
PROG = {"standalone": "allennlp-analyze", "plugin": "allennlp analyze"}


def _error(result, front):
    """The one stderr line of a failed case, without the program's prefix."""
    assert result["rc"] == 2, result
    lines = result["err"].splitlines()
    assert len(lines) == 1, result["err"]
    prefix = f"{PROG[front]}: error: "
    assert lines[0].startswith(prefix), lines[0]
    assert not CONTROL.search(lines[0]), lines[0]
    return lines[0][len(prefix):]


def _both_errors(batches, case, *fragments):
    """Both front-ends refuse ``case`` with one line holding every fragment; the lines agree."""
    found = {front: _error(batches[front][case], front) for front in FRONTS}
    for front, message in found.items():
        for fragment in fragments:
            assert fragment in message, (front, message)
    return found


@pytest.mark.parametrize("name, kind", [
    ("fifo.th", "a FIFO"), ("fifo.safetensors", "a FIFO"), ("fifo.tar.gz", "a FIFO"),
    ("fifo", "a FIFO"), ("zero.th", "a character device"), ("zero.tar.gz", "a character device"),
    ("zero.safetensors", "a character device"), ("zero", "a character device")])
def test_special_files_are_refused_before_any_read(batches, inputs, name, kind):
    found = _both_errors(batches, f"special:{name}", f"{inputs[name]} is not a regular file",
                         f"(it is {kind}")
    assert found["standalone"] == found["plugin"]
    for front in FRONTS:
        assert batches[front][f"special:{name}"]["seconds"] < 30


def test_sources_from_and_weights_file_special_or_binary(batches):
    for front in FRONTS:
        r = batches[front]
        assert "a FIFO" in _error(r["sources_from_fifo"], front)
        assert "a character device" in _error(r["sources_from_zero"], front)
        assert "is not a text file (not UTF-8)" in _error(r["sources_from_binary"], front)
        assert "is not a text file (control characters" in _error(r["sources_from_nul"], front)
    assert "--weights-file" in _error(batches["plugin"]["weights_file_fifo"], "plugin")
    assert "a FIFO" in _error(batches["plugin"]["weights_file_fifo"], "plugin")


@pytest.mark.parametrize("case, fragments", [
    ("truncated", ["is truncated"]),
    ("bad_crc", ["is corrupt", "CRC check failed"]),
    ("two_weights", ["holds two members named 'weights.th'", "ambiguous"]),
    ("dot_twin", ["holds two members named 'weights.th'"]),
    ("nested_weights", ["holds two weights.th (weights.th, model/weights.th)", "ambiguous"]),
    ("symlink_weights", ["its weights.th is a symbolic link, not a regular file"]),
    ("hardlink_weights", ["its weights.th is a hard link, not a regular file"]),
    ("fifo_weights", ["its weights.th is a FIFO, not a regular file"]),
    ("device_weights", ["its best.th is a character device"]),
    ("bomb_member", ["decompresses to more than", "a gzip bomb?"]),
    ("bomb_tail", ["decompresses to more than", "a gzip bomb?"]),
])
def test_broken_and_ambiguous_archives_refused_alike(batches, inputs, case, fragments):
    found = _both_errors(batches, f"archive:{case}", str(inputs[case]), *fragments)
    assert found["standalone"] == found["plugin"]
    for front in FRONTS:
        r = batches[front][f"archive:{case}"]
        assert r["out"] == "" and r["seconds"] < 30, r


def test_plugin_leaves_no_temporary_files(batches):
    """Every case, including the bombs and the refused archives: $TMPDIR is empty after it
    (but for the empty cache folder torch makes there when AllenNLP imports it)."""
    for front in FRONTS:
        left = {case: [p for p in r["left"] if not p.startswith("torchinductor_")]
                for case, r in batches[front].items() if not case.startswith("_")}
        left = {case: files for case, files in left.items() if files}
        assert left == {}, front


def test_many_members_and_model_files(batches, inputs):
    """20000 members: both analyze the archive (the plugin extracts only the model's files);
    1100 vocabulary files (over MAX_EXTRACTED_FILES): the model is not built, raw weights."""
    docs = {}
    for front in FRONTS:
        r = batches[front]["many"]
        assert r["rc"] == 0 and r["err"] == "" and r["seconds"] < 60, r
        docs[front] = json.loads(r["out"])
    assert len(docs["plugin"]["records"]) == len(docs["standalone"]["records"]) == 5
    assert {x["module_type"] for x in docs["plugin"]["records"]} == {"LSTM", "Linear"}
    r = batches["plugin"]["many_vocab"]
    assert r["rc"] == 0 and "more than 1000 model files" in r["err"] and r["err"].count("\n") == 1
    assert batches["standalone"]["many_vocab"]["rc"] == 0


def test_deep_json_is_refused_without_recursion(batches, inputs):
    for case, fragment in (("deep_header", "corrupt safetensors header"),
                           ("deep_index", "not a valid checkpoint index")):
        found = _both_errors(batches, f"header:{case}", fragment, "nested more than 64 levels deep")
        assert found["standalone"] == found["plugin"]
    # config.json: the model is not built, its raw weights are analyzed, with one note
    r = batches["plugin"]["deep_config"]
    assert r["rc"] == 0 and r["err"].count("\n") == 1, r
    assert "nested more than 64 levels deep" in r["err"] and "analyzing the raw weights" in r["err"]
    assert len(json.loads(r["out"])["records"]) == 5
    assert batches["standalone"]["deep_config"]["rc"] == 0


def test_lying_lora_adapters_are_one_line(batches):
    found = _both_errors(batches, "lora_lying_r", "adapter_config.json gives fc rank r = 8",
                         "lora_A is 4 x 10")
    assert found["standalone"] == found["plugin"]
    found = _both_errors(batches, "lora_absent", "adapted module gc.weight is not in the base")
    assert found["standalone"] == found["plugin"]


@pytest.mark.parametrize("case, fragment", [
    ("shape_float", "has a bad shape [1e+30]"),
    ("shape_huge", "do not match shape [1000000000000000000000000000000]"),
    ("shape_overflow", "do not match shape [4294967296, 4294967296]"),
])
def test_impossible_shapes_are_refused(batches, case, fragment):
    found = _both_errors(batches, f"header:{case}", "corrupt safetensors header", fragment)
    assert found["standalone"] == found["plugin"]


@pytest.mark.parametrize("case, fragments", [
    ("truncated", ["truncated.onnx is not a valid ONNX model (truncated or corrupt"]),
    ("past_end", ["weights.bin is truncated (tensor 'w' ends at byte 1000000048, the file "
                  "holds 48)"]),
    ("escape", ["has its data at '../outside.bin', outside the model's folder: refused"]),
    ("symlink", ["has its data at 'link.bin', outside the model's folder: refused"]),
    ("absurd", ["w (1000000000000 x 1000000000000) needs", "of memory"]),
    ("deep", ["deep.onnx nests subgraphs more than 16 levels deep"]),
    ("deeper", ["deeper.onnx is not a valid ONNX model", "MaxDepth"]),
    ("sparse_range", ["sparse_range.onnx: sparse tensor 'w': index 12 of value 1 is outside its "
                      "12 elements"]),
    ("sparse_count", ["sparse_count.onnx: sparse tensor 'w': indices of shape [2] for 3 values "
                      "of a 2-D tensor (ONNX: [3] or [3, 2])"]),
    ("sparse_absurd", ["w (10000000 x 10000000) needs", "of memory"]),
    ("qdq_scale", ["qdq_scale.onnx: quantized tensor 'conv.weight_quantized': a scale or zero "
                   "point of shape (6,) does not fit a tensor of shape (8, 6, 3, 3) (axis 0, "
                   "block size 0)"]),
])
def test_hostile_onnx_files(batches, case, fragments):
    found = _both_errors(batches, f"onnx:{case}", *fragments)
    if case not in ("absurd", "sparse_absurd"):  # there the fronts' memory limits differ
        assert found["standalone"] == found["plugin"]
    for front in FRONTS:
        assert batches[front][f"onnx:{case}"]["seconds"] < 30


def test_onnx_file_in_both_front_ends(batches, inputs):
    """The plugin and the standalone command read an ONNX file alike: its MatMul weight (in x
    out as stored) as the out x in matrix the model uses, equal to numpy's SVD."""
    import onnx
    from onnx import numpy_helper

    W = numpy_helper.to_array(onnx.load(str(inputs["onnx_ok"])).graph.initializer[0]).T
    sv = np.linalg.svd(W.astype(np.float64), compute_uv=False)
    found = []
    for front in FRONTS:
        r = batches[front]["onnx:ok"]
        assert r["rc"] == 0, r
        (rec,) = json.loads(r["out"])["records"]
        assert (rec["name"], rec["shape"], rec["kind"]) == ("w", [32, 64], "linear")
        assert rec["sv_max"] == pytest.approx(sv[0], rel=1e-9)
        assert rec["sv_min"] == pytest.approx(sv[-1], rel=1e-7)
        found.append({k: v for k, v in rec.items() if k != "model"})
    assert found[0] == found[1]


@pytest.mark.parametrize("case, fragment", [
    ("bits", "the config says 8 bits, but"), ("scales", "scales has shape (4, 32)"),
    ("g_idx", "names groups 3..6, the scales hold 4"), ("width", "5 words per row"),
    ("marlin", "the Marlin layout is re-tiled"), ("3bit", "3-bit GPTQ packing is not supported")])
def test_hostile_packed_layers(batches, case, fragment):
    """GPTQ / compressed-tensors folders whose config lies or whose side tensors do not fit,
    and a kernel-tiled layout: one line naming the problem."""
    found = _both_errors(batches, f"packed:{case}", fragment)
    assert found["standalone"] == found["plugin"]


@pytest.mark.parametrize("case, fragment", [
    ("count", "4611686018427387904 tensor infos"), ("offset", "past the end"),
    ("shape", "more elements than the file has bits"), ("truncated", "truncated"),
    ("string", "claims 9223372036854775808 bytes")])
def test_hostile_gguf_headers(batches, case, fragment):
    """Checked by the header scan before anything is allocated (within the memory limit)."""
    found = _both_errors(batches, f"gguf:{case}", "is not a valid GGUF file", fragment)
    assert found["standalone"] == found["plugin"]


@pytest.mark.parametrize("case, fragment", [
    ("ts_missing", "storage 1 is missing from the zip"),
    ("ts_lying", "storage 0 holds 44 bytes, the pickle says 48"),
])
def test_broken_torchscript_archives(batches, inputs, case, fragment):
    """A TorchScript archive whose data.pkl names a record that is not there, or whose record
    is shorter than the tensor it holds: one line, exit 2, from either front."""
    found = _both_errors(batches, f"torchscript:{case}", str(inputs[case]),
                         "not a valid PyTorch file", fragment)
    assert found["standalone"] == found["plugin"]


def test_empty_tensors_with_countless_positions(batches):
    for front in FRONTS:
        r = batches[front]["empty_conv"]
        assert r["rc"] == 0 and r["seconds"] < 30, r
        doc = json.loads(r["out"])
        assert [x["name"] for x in doc["records"]] == ["v"]
        assert doc["summary"]["skipped"] == {"empty (a dimension of size 0)": 1}


def test_a_matrix_too_large_for_memory_is_named(batches, inputs):
    """40000 x 20000 float32, a hole on disk: needs 8 (5 M^2 + 2 B M) bytes of float64 working
    memory (streamed in blocks of B rows: the Gram matrix and the SVD fallback's blocked QR),
    checked against what the process's limit leaves before anything is read."""
    # streamed (more than one block of rows): the Gram matrix and the SVD fallback's blocked QR
    need = 8 * (5 * 20000**2 + 2 * spectrum.BLOCK_ROWS * 20000)
    for front in FRONTS:
        message = _error(batches[front]["sparse"], front)
        assert f"big.weight (40000 x 20000) needs {need / 2**30:.1f} GiB of memory" in message
        assert "the process limit (ulimit -v) leaves" in message


def test_100000_tensors_listed_in_bounded_time(batches):
    for front in FRONTS:
        r = batches[front]["tiny"]
        assert r["rc"] == 0 and r["seconds"] < 60, r
        doc = json.loads(r["out"])
        assert [x["name"] for x in doc["records"]] == ["m77777.weight"]
        assert doc["summary"]["skipped"] == {"not matched by --match": 99_999}


@pytest.mark.parametrize("option, fragment", [
    ("--min-q inf", "--min-q must be a finite number (got inf)"),
    ("--loose-tol inf", "--loose-tol must be a finite number (got inf)"),
    ("--min-q nan", "--min-q must be a finite number (got nan)"),
    ("--log10-threshold nan --format json", "--log10-threshold must be a finite number"),
    ("--loose-tol 1e309", "--loose-tol must be a finite number (got inf)"),
    ("--device meta", "--device meta: only cpu and cuda devices"),
    ("--device mps", "--device mps: only cpu and cuda devices"),
    ("--workers 100000", "--workers must be between 0"),
])
def test_bad_option_values(batches, option, fragment):
    found = _both_errors(batches, f"option:{option}", fragment)
    assert found["standalone"] == found["plugin"]
    for front in FRONTS:
        assert batches[front][f"option:{option}"]["out"] == ""


def test_include_package_and_bad_settings(batches):
    message = _error(batches["plugin"]["option:--include-package no_such_module"], "plugin")
    assert message.startswith("--include-package no_such_module: cannot import it "
                              "(ModuleNotFoundError")
    # the standalone command has no such option: argparse's one line
    assert "unrecognized arguments: --include-package" in _error(
        batches["standalone"]["option:--include-package no_such_module"], "standalone")
    _both_errors(batches, "env:bad_timeout",
                 "ALLENNLP_ANALYZE_READ_TIMEOUT must be a positive number of seconds (got 'soon')")


def test_names_are_escaped_in_text_and_exact_in_json(batches, inputs):
    names = inputs["names_list"]
    escaped = ["plain.weight", "new\\nline.weight", "esc\\x1b[2J\\x1b[31m.weight",
               "rtl\\u202eexe.weight"]
    for front in FRONTS:
        table = batches[front]["names_table"]["out"].splitlines()
        csv_lines = batches[front]["names_csv"]["out"].splitlines()
        assert not CONTROL.search("\n".join(table + csv_lines))
        for name in escaped:  # each record on one line, whole
            assert len([ln for ln in table if ln.startswith(name + " ") and "12 x 4" in ln]) == 1
            assert len([ln for ln in csv_lines if ln.split(",")[1] == name]) == 1
        assert len(csv_lines) == 1 + len(names)
        doc = json.loads(batches[front]["names_json"]["out"])
        assert sorted(r["name"] for r in doc["records"]) == sorted(names)
        message = _error(batches[front]["missing_name"], front)
        assert "miss\\ning\\x1b[2J.th" in message  # ("[2J": a glob that matches nothing)
        # an undecodable file name: escaped in the table, written to a strict UTF-8 file
        r = batches[front]["weird_name"]
        assert r["rc"] == 0 and r["err"] == "", r
        out = (batches[front]["_work"] / "weird.out").read_text(encoding="utf-8")
        assert "bad\\udcff\\x1b[31mname.safetensors" in out  # the model column
        assert not CONTROL.search(out) and "2 matrices analyzed in 2 models" in out


def test_full_disk_on_stdout(batches):
    for front in FRONTS:
        message = _error(batches[front]["full_disk"], front)
        assert message == "cannot write the report to standard output: No space left on device"


@pytest.mark.parametrize("case, fragments", [
    ("silent", ["no response within 1 s", "ALLENNLP_ANALYZE_READ_TIMEOUT"]),
    ("drip_headers", ["no response within 1 s"]),
    ("drip_body", ["stalled: less than 1.0 KiB/s for 1 s"]),
    ("connect", ["timed out connecting (1 s, ALLENNLP_ANALYZE_CONNECT_TIMEOUT)"]),
    ("html", ["is not usable: the server sent a web page (Content-Type text/html",
              "it was not cached"]),
    ("no_length", ["is not usable: it is truncated; it was not cached"]),
    ("loop", ["too many redirects (a redirect loop?)"]),
    ("br", ["unsupported Content-Encoding 'br'"]),
    ("gzip_bomb", ["decodes (gzip) to more than"]),
    ("endless", ["is larger than 8.0 MiB"]),
    ("huge_length", ["is larger than 1.0 GiB (the size cap"]),
])
def test_bad_downloads(batches, case, fragments):
    found = _both_errors(batches, f"net:{case}", *fragments)
    same = {front: re.sub(r"\(\d+ bytes received", "(N bytes received", message)  # timing
            for front, message in found.items()}
    assert same["standalone"] == same["plugin"]
    for front in FRONTS:
        assert batches[front][f"net:{case}"]["seconds"] < 20, batches[front][f"net:{case}"]






@pytest.mark.parametrize(
    "key, fragment",
    [(f"keras:{c}", f) for c, f in H.KERAS_CASES]
    + [(f"keras_sharded:{c}", f) for c, f in H.KERAS_SHARDED_CASES],
)
def test_hostile_keras_files(batches, inputs, key, fragment):
    """Both front-ends refuse each Keras file (and sharded index) with the same one line,
    exit 2, nothing on stdout, under the memory limit, quickly."""
    found = _both_errors(batches, key, str(inputs[key]), fragment)
    assert found["standalone"] == found["plugin"]
    for front in FRONTS:
        r = batches[front][key]
        assert r["rc"] == 2 and r["out"] == "" and r["seconds"] < 30, r


@pytest.mark.parametrize("key, shard", [("keras:good", None),
                                        ("keras_sharded:good", "m_00000.weights.h5")])
def test_keras_file_through_both_front_ends(batches, inputs, key, shard):
    """The file (or sharded index: a Dense layer split over two shards) the hostile cases are
    made from: both front-ends analyze its kernel alike, h5py's own array."""
    import h5py

    path = inputs[key] if shard is None else inputs[key].parent / shard
    with h5py.File(path, "r") as f:
        kernel = f["layers/dense/vars/0"][()]
    sv = np.linalg.svd(kernel.astype(np.float64).T, compute_uv=False)
    for front in FRONTS:
        r = batches[front][key]
        assert r["rc"] == 0 and r["err"] == "", r
        (record,) = json.loads(r["out"])["records"]
        assert record["name"] == "dense.kernel" and record["shape"] == [4, 6]
        assert record["sv_max"] == pytest.approx(sv[0], rel=1e-12)


def test_cache_keeps_only_complete_usable_downloads(batches, inputs):
    """Encoded responses are decoded (a .tar.gz labelled gzip-encoded is kept as sent) and give
    the local files' values; the HTML page was fetched every time (never cached); nothing but
    the good downloads is in either command's cache, no partial file anywhere."""
    fc = np.frombuffer(inputs["st"].read_bytes()[-1200:], "<f4").reshape(30, 10)
    sv = np.linalg.svd(fc.astype(np.float64), compute_uv=False)
    tagger = {r["name"]: r["sv_max"] for r in json.loads(batches["standalone"]["many"]["out"])["records"]}
    for front in FRONTS:
        r = batches[front]
        for case in ("net:gzip_label", "net:deflate_encoded", "net:ok", "net:ok_again"):
            assert r[case]["rc"] == 0, (front, case, r[case])
            records = json.loads(r[case]["out"])["records"]
            assert {x["name"]: x["sv_max"] for x in records} == tagger, (front, case)
        assert r["net:gzip_encoded"]["rc"] == 0, r["net:gzip_encoded"]
        (record,) = json.loads(r["net:gzip_encoded"]["out"])["records"]
        assert record["sv_max"] == pytest.approx(sv[0], rel=1e-12)
        assert record["sv_min"] == pytest.approx(sv[-1], rel=1e-12)
        assert _error(r["net:html_again"], front) == _error(r["net:html"], front)
        cache = r["_work"] / "cache"
        files = sorted(p.name for p in cache.rglob("*") if not p.is_dir())
        assert files == ["model.safetensors", "model.tar.gz", "model.tar.gz", "tagger.tar.gz"]
        assert not list(cache.rglob(".download-*"))
    log = batches["_log"]
    assert log.count("/html/model.tar.gz") == 4  # twice per front-end: never from a cache
    assert log.count("/file/model.tar.gz") == 2  # once per front-end: then from its cache


# ---------------------------------------------------------------------------------------------
# Signals: Ctrl-C and SIGTERM while a download is stalled


@pytest.fixture(scope="module")
def dripping(inputs):
    server = H.HostileServer(inputs["www"])
    yield server
    server.close()


def _interrupt(command, server, sig, tmp_path):
    cache, tmp = tmp_path / "cache", tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONPATH=str(REPO), HOME=str(tmp_path),
               PYTHONWARNINGS="ignore", ALLENNLP_ANALYZE_READ_TIMEOUT="120")
    before = len(server.routes.log)
    proc = subprocess.Popen([*command, f"{server.base}/drip-body/model.tar.gz",
                             "--cache-dir", str(cache)], cwd=str(REPO), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(server.routes.log) == before and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # inside the body's read
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = [p for folder in (cache, tmp) for p in folder.rglob("*") if p.is_file()]
    return proc.returncode, out, err, left


@pytest.mark.parametrize("front, sig, rc, word", [
    ("plugin", signal.SIGINT, 130, "interrupted"),
    ("standalone", signal.SIGINT, 130, "interrupted"),
    ("standalone", signal.SIGTERM, 143, "terminated"),
])
def test_signals_during_a_download(dripping, tmp_path, front, sig, rc, word):
    command = [str(ALLENNLP), "analyze"] if front == "plugin" else \
        [sys.executable, "-m", "allennlp_analyze"]
    code, out, err, left = _interrupt(command, dripping, sig, tmp_path)
    assert code == rc and out == "", err
    assert err == f"{PROG[front]}: {word}\n"
    assert left == []  # no partial download, nothing cached


def test_cache_path_is_stable():
    """The cache layout the tests above rely on: <cache>/<16 hex>/<basename>."""
    path = remote.cache_path("http://h/x/model.tar.gz", "/c")
    assert re.fullmatch(r"/c/[0-9a-f]{16}/model\.tar\.gz", path.as_posix())
