"""`allennlp analyze`: the registered subcommand end to end (real `allennlp` processes on real
archives, a local HTTP server and AllenNLP's download cache), its fallback to raw weights, its
safety against hostile archives, and its records against the standalone `allennlp-analyze`.

AllenNLP processes take ~10 s each to start, so the end-to-end checks share three of them,
started together by the module fixture `runs`; everything else runs in this process.
"""
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import serving

pytest.importorskip("allennlp")
import torch  # noqa: E402

from allennlp_analyze import analyze, cli  # noqa: E402
from allennlp_analyze.errors import AnalyzeError  # noqa: E402
from allennlp_analyze.plugin import loading, register  # noqa: E402
from allennlp_analyze.plugin.subcommand import Analyze, analyze_archives  # noqa: E402
from allennlp_analyze.sources import remote  # noqa: E402
from allennlp_analyze.options import AnalysisOptions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARCHIVES = REPO / "fixtures" / "archives"
TAGGER = ARCHIVES / "tagger_lstm.tar.gz"
CLASSIFIER = ARCHIVES / "classifier_transformer.tar.gz"
CLASSIFIER_L2 = ARCHIVES / "classifier_transformer_l2.tar.gz"
WHEEL09 = REPO / ".cache" / "wheels" / "allennlp-0.9.0-py3-none-any.whl"
ALLENNLP = Path(sys.executable).parent / "allennlp"
TIMEOUT = 240


def _archives09():
    if not WHEEL09.is_file():
        return []
    with zipfile.ZipFile(WHEEL09) as z:
        return sorted(n for n in z.namelist() if n.endswith("model.tar.gz"))


ARCHIVES09 = _archives09()


def _env(home: Path, cache_root: Path) -> dict:
    env = dict(os.environ)
    env.update(HOME=str(home), ALLENNLP_CACHE_ROOT=str(cache_root), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    for key in ("ALLENNLP_LOG_LEVEL", "ALLENNLP_DEBUG", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        env.pop(key, None)
    return env


# ---------------------------------------------------------------------------------------------
# A local web server that logs every request


class _Handler(http.server.SimpleHTTPRequestHandler):
    log: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).log.append(("GET", self.path))
        super().do_GET()

    def do_HEAD(self):
        type(self).log.append(("HEAD", self.path))
        super().do_HEAD()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    shutil.copy(TAGGER, root / "tagger_lstm.tar.gz")
    data = CLASSIFIER.read_bytes()
    (root / "corrupt.tar.gz").write_bytes(data[: len(data) // 2])  # a truncated download
    with serving(root, _Handler) as (base, log):
        yield base, log


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A serialization directory (the L2 archive, unpacked) and the 26 AllenNLP 0.9 archives."""
    base = tmp_path_factory.mktemp("inputs")
    serdir = base / "l2_run"
    serdir.mkdir()
    with tarfile.open(CLASSIFIER_L2, "r:gz") as tar:
        tar.extractall(serdir, filter="data")
    old = []
    if ARCHIVES09:
        with zipfile.ZipFile(WHEEL09) as z:
            for name in ARCHIVES09:
                label = name.split("fixtures/")[1].rsplit("/model.tar.gz")[0].replace("/", "__")
                path = base / "09" / f"{label}.tar.gz"
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(z.read(name))
                old.append(path)
    return serdir, old


@pytest.fixture(scope="module")
def runs(server, inputs, tmp_path_factory):
    """Three `allennlp` processes:

    first:  from a scratch directory, the plugin registered only in a fresh $HOME's global
            plugins file: a URL, a serialization directory, an archive and the 0.9 archives;
    help:   `allennlp analyze --help`, from another scratch directory, same $HOME;
    second: from the repository root (`.allennlp_plugins`), no global registration, the same
            download cache: the URL again, a 404 URL and a truncated download.
    """
    base, log = server
    serdir, old = inputs
    tmp = tmp_path_factory.mktemp("runs")
    home, bare_home, cache_root = tmp / "home", tmp / "bare_home", tmp / "cache_root"
    for d in (home, bare_home, tmp / "cwd1", tmp / "cwd2"):
        d.mkdir()
    assert register.main(["--plugins-file", str(home / ".allennlp" / "plugins")]) == 0
    url = f"{base}/tagger_lstm.tar.gz"
    first_args = [url, str(serdir), str(CLASSIFIER), *map(str, old)]

    def start(args, cwd, env_home, out):
        return subprocess.Popen([str(ALLENNLP), *args], cwd=cwd, env=_env(env_home, cache_root),
                                stdout=out, stderr=subprocess.PIPE, text=True)

    first = start(["analyze", *first_args, "--format", "json", "-o", str(tmp / "first.json")],
                  tmp / "cwd1", home, subprocess.PIPE)
    helped = start(["analyze", "--help"], tmp / "cwd2", home, subprocess.PIPE)
    results = {}
    for name, proc in (("first", first), ("help", helped)):
        out, err = proc.communicate(timeout=TIMEOUT)
        results[name] = (proc.returncode, out, err)
    gets_after_first = [p for m, p in log if m == "GET"]
    second = start(["analyze", url, f"{base}/missing.tar.gz", f"{base}/corrupt.tar.gz",
                    "--format", "json", "-o", str(tmp / "second.json")],
                   REPO, bare_home, subprocess.PIPE)
    out, err = second.communicate(timeout=TIMEOUT)
    results["second"] = (second.returncode, out, err)
    return dict(results, tmp=tmp, url=url, base=base, log=log, first_args=first_args,
                gets_after_first=gets_after_first, cache=cache_root / "cache")


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _without(record: dict, *keys) -> dict:
    return {k: v for k, v in record.items() if k not in keys}


def test_help_lists_the_command_from_any_directory(runs):
    code, out, err = runs["help"]
    assert code == 0, err
    assert "usage: allennlp analyze" in out
    for flag in ("--weights-file", "--overrides", "--cuda-device", "--include-package",
                 "--min-q", "--rank-criterion", "--format", "--fail-on-collapse", "--describe"):
        assert flag in out, flag


def test_first_run_url_serialization_dir_and_09_archives(runs, inputs):
    code, out, err = runs["first"]
    assert code == 0, err
    doc = _json(runs["tmp"] / "first.json")
    serdir, old = inputs
    models = doc["summary"]["models"]
    assert models == ["tagger_lstm.tar.gz", "l2_run", "classifier_transformer.tar.gz",
                      *[p.name for p in old]]
    assert doc["summary"]["errors"] == [] and doc["summary"]["complete"]
    by_model = {}
    for r in doc["records"]:
        by_model.setdefault(r["model"], {})[r["name"]] = r
    # Built models: every matrix has its module type.
    tagger = by_model["tagger_lstm.tar.gz"]
    assert {n: r["module_type"] for n, r in tagger.items()} == {
        "encoder._module.weight_ih_l0": "LSTM", "encoder._module.weight_hh_l0": "LSTM",
        "encoder._module.weight_ih_l0_reverse": "LSTM",
        "encoder._module.weight_hh_l0_reverse": "LSTM",
        "tag_projection_layer._module.weight": "Linear"}
    assert all(r["module_type"] for m in ("l2_run", "classifier_transformer.tar.gz")
               for r in by_model[m].values())
    l2 = by_model["l2_run"]
    assert l2["_seq2seq_encoder._transformer.layers.0.self_attn.in_proj_weight"][
        "module_type"] == "MultiheadAttention"
    assert sorted(n for n, r in l2.items() if r["rank_loose"] < r["M"]) == [
        "_feedforward._linear_layers.0.weight",
        "_seq2seq_encoder._transformer.layers.0.linear1.weight",
        "_seq2seq_encoder._transformer.layers.0.linear2.weight"]
    # The 0.9 archives: most configs no longer build; their raw weights are analyzed, each with
    # one note on stderr, and the run succeeds.
    lines = err.strip().splitlines()
    assert lines and all(line.startswith("allennlp analyze: note: ") for line in lines), err
    noted = {line.split("note: ")[1].split(":")[0] for line in lines}
    assert noted <= {p.name for p in old}
    assert len(noted) == len(lines) >= len(old) - 4
    assert "'bidaf' is not a registered name for 'Model'" in err
    for p in old:
        assert p.name in by_model or p.name in doc["summary"]["models"]


def test_records_equal_the_standalone_command(runs, inputs, capsys, tmp_path):
    """Same matrices, same values, same kinds; the plugin's module types only add to the
    standalone's (and are the evidence for the kinds of built models)."""
    args = [str(TAGGER) if a == runs["url"] else a for a in runs["first_args"]]
    assert cli.main([*args, "--format", "json", "-o", str(tmp_path / "sa.json")]) == 0
    capsys.readouterr()
    plugin, alone = _json(runs["tmp"] / "first.json"), _json(tmp_path / "sa.json")
    assert plugin["summary"] == alone["summary"]
    assert plugin["options"] == alone["options"]
    assert len(plugin["records"]) == len(alone["records"])
    richer = 0
    for p, a in zip(plugin["records"], alone["records"]):
        assert _without(p, "module_type", "kind_from") == _without(a, "module_type", "kind_from")
        assert a["module_type"] in (None, p["module_type"]), (p["name"], a["module_type"])
        richer += a["module_type"] is None and p["module_type"] is not None
    assert richer > 0


def test_second_run_uses_the_cache_and_reports_errors(runs):
    code, out, err = runs["second"]
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 2, err
    assert all(line.startswith("allennlp analyze: error: ") for line in lines), err
    missing = [line for line in lines if "missing.tar.gz" in line]
    corrupt = [line for line in lines if "corrupt.tar.gz" in line]
    assert missing and "HTTP 404" in missing[0]
    assert corrupt and "is not usable: it is truncated; it was not cached" in corrupt[0]
    doc = _json(runs["tmp"] / "second.json")
    assert doc["summary"]["models"] == ["tagger_lstm.tar.gz"]
    assert len(doc["records"]) == 5 and not doc["summary"]["complete"]
    # Downloaded once, in the first run, into AllenNLP's cache ($ALLENNLP_CACHE_ROOT/cache).
    gets = [p for m, p in runs["log"] if m == "GET"]
    assert runs["gets_after_first"] == ["/tagger_lstm.tar.gz"]
    assert gets.count("/tagger_lstm.tar.gz") == 1
    assert ("GET", "/corrupt.tar.gz") in runs["log"]
    # Only the usable download is cached (the truncated one never was), nothing else is left.
    cached = [p for p in runs["cache"].rglob("*") if not p.is_dir()]
    assert cached == [remote.cache_path(runs["url"], runs["cache"])]


# ---------------------------------------------------------------------------------------------
# In-process: the command's error lines, options and loading rules


def _run_command(argv, capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="allennlp")
    Analyze().add_subparser(parser.add_subparsers())
    args = parser.parse_args(["analyze", *argv])
    with pytest.raises(SystemExit) as exc:
        args.func(args)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_single_source_errors_are_one_line(server, tmp_path, capsys):
    base, _ = server
    cache = ["--cache-dir", str(tmp_path / "cache")]
    for argv, fragment in (
        ([f"{base}/missing.tar.gz", *cache], f"cannot download {base}/missing.tar.gz: HTTP 404"),
        ([f"{base}/corrupt.tar.gz", *cache], "is truncated"),
        ([str(tmp_path / "nothere.tar.gz")], "nothere.tar.gz does not exist"),
        ([str(TAGGER), "--overrides", "{not json"], "--overrides is not valid JSON"),
        ([str(TAGGER), "--overrides", '{"model.nothere.x": 1}'], "--overrides: "),
        ([str(TAGGER), "--cuda-device", "99"], "--cuda-device 99: this machine has"),
    ):
        code, out, err = _run_command(argv, capsys)
        assert code == 2, (argv, err)
        assert err.count("\n") == 1 and err.startswith("allennlp analyze: error: "), err
        assert fragment in err, (fragment, err)


def test_weights_file_and_overrides(tmp_path, capsys):
    with tarfile.open(CLASSIFIER_L2, "r:gz") as tar:
        (tmp_path / "l2_weights.th").write_bytes(tar.extractfile("weights.th").read())
    opts = AnalysisOptions()
    swapped = analyze_archives(str(CLASSIFIER), options=opts,
                               weights_file=str(tmp_path / "l2_weights.th"))
    l2 = analyze_archives(str(CLASSIFIER_L2), options=opts)
    assert [_without(r, "model") for r in swapped.to_dicts()] == \
        [_without(r, "model") for r in l2.to_dicts()]
    assert capsys.readouterr().err == ""
    # An override that no longer matches the weights: not built, raw weights, one note.
    notes = []
    source = loading.open_model_source(
        str(TAGGER), overrides='{"model.encoder.hidden_size": 32}', notice=notes.append)
    assert len(notes) == 1 and "size mismatch" in notes[0] and notes[0].startswith(
        "tagger_lstm.tar.gz: analyzing the raw weights")
    assert type(source).__name__ == "ArchiveSource"


def test_other_sources_pass_through(tmp_path):
    state = {"layer.weight": torch.randn(8, 4)}
    torch.save(state, tmp_path / "plain.th")
    notes = []
    source = loading.open_model_source(str(tmp_path / "plain.th"), notice=notes.append)
    assert notes == [] and [i.name for i in source.tensors()] == ["layer.weight"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_built_on_cuda_gives_the_same_records():
    on_cpu = analyze_archives(str(TAGGER), options=AnalysisOptions()).to_dicts()
    on_gpu = analyze_archives(str(TAGGER), options=AnalysisOptions(), cuda_device=0).to_dicts()
    assert on_gpu == on_cpu


# ---------------------------------------------------------------------------------------------
# Hostile archives


def _members(archive: Path) -> dict:
    with tarfile.open(archive, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def _write_archive(path: Path, members: dict, extra=()) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return path


class _Payload:
    """Unpickling this creates the marker file: code execution, if it ever happens."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_is_never_run(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"tag_projection_layer._module.weight": torch.zeros(9, 128),
                "payload": _Payload(marker)}, buf)
    members = dict(_members(TAGGER), **{"weights.th": buf.getvalue()})
    archive = _write_archive(tmp_path / "evil.tar.gz", members)
    # The variable that turns torch's weights_only default off for calls that do not pass it
    # (AllenNLP's read_state_dict does not): it must not matter.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    notes = []
    # Only the tensors are read (issue 16: the payload is an inert placeholder); the model,
    # which lacks its other weights, is not built.
    source = loading.open_model_source(str(archive), notice=notes.append)
    assert [i.name for i in source.tensors()] == ["tag_projection_layer._module.weight"]
    assert "io.open" in source.note and "never ran" in source.note
    assert len(notes) == 1 and "analyzing the raw weights" in notes[0]
    assert not marker.exists()
    # ... and the payload is real: a default torch.load under that variable runs it.
    with pytest.warns(UserWarning):
        torch.load(io.BytesIO(buf.getvalue()))
    assert marker.exists()


def test_unsafe_members_are_not_extracted(tmp_path, monkeypatch):
    def evil(name, **kw):
        info = tarfile.TarInfo(name)
        for k, v in kw.items():
            setattr(info, k, v)
        return info

    cases = {
        "dotdot": [evil("../escaped.txt", size=3)],
        "absolute": [evil(str(tmp_path / "absolute.txt"), size=3)],
        "symlink": [evil("vocabulary/link", type=tarfile.SYMTYPE, linkname="/etc/passwd")],
        "hardlink": [evil("hard", type=tarfile.LNKTYPE, linkname="../../etc/passwd")],
    }
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(workdir))
    expected = analyze_archives(str(TAGGER), options=AnalysisOptions()).to_dicts()
    for case, extra in cases.items():
        archive = _write_archive(tmp_path / f"{case}.tar.gz", _members(TAGGER), extra)
        notes = []
        source = loading.open_model_source(str(archive), notice=notes.append)
        assert len(notes) == 1 and "unsafe archive member, not extracted" in notes[0], notes
        records = analyze(source).to_dicts()  # the raw weights, read without extracting
        assert [_without(r, "model", "module_type", "kind_from") for r in records] == \
            [_without(r, "model", "module_type", "kind_from") for r in expected], case
    assert not (workdir / "escaped.txt").exists() and not (tmp_path / "absolute.txt").exists()
    assert list(workdir.iterdir()) == []  # the extraction folders are gone


def test_configs_that_would_run_code_are_not_built(tmp_path):
    marker = tmp_path / "pwned"
    members = _members(TAGGER)
    config = json.loads(members["config.json"])
    config["model"] = {"type": "os.system", "command": f"touch {marker}"}
    members["config.json"] = json.dumps(config).encode()
    archive = _write_archive(tmp_path / "code.tar.gz", members)
    notes = []
    loading.open_model_source(str(archive), notice=notes.append)
    assert not marker.exists()
    assert len(notes) == 1 and "names the class 'os.system' by import path" in notes[0]
    reason = loading.unsafe_config_reason
    assert reason(json.loads(_members(TAGGER)["config.json"])) is None
    assert "model.text_field_embedder._pretrained" in reason(
        {"model": {"text_field_embedder": {"_pretrained": {"archive_file": "x"}}}})
    assert "trust_remote_code" in reason(
        {"model": {"embedder": {"transformer_kwargs": {"trust_remote_code": True}}}})
    assert "archive_file" in reason({"model": {"type": "from_archive", "archive_file": "x"}})
    assert reason({"model": {"type": "basic_classifier",
                             "seq2vec_encoder": {"type": "boe"}}}) is None
    assert "builtins.exec" in reason({"model": {"layers": [{"type": "builtins.exec"}]}})


# ---------------------------------------------------------------------------------------------
# Registration


def test_register_is_idempotent_and_keeps_other_plugins(tmp_path, capsys):
    path = tmp_path / ".allennlp" / "plugins"
    path.parent.mkdir()
    path.write_text("my_plugin\n")
    for _ in range(2):
        assert register.main(["--plugins-file", str(path)]) == 0
    assert path.read_text() == "my_plugin\nallennlp_analyze.plugin\n"
    assert "already in" in capsys.readouterr().out
    assert register.main(["--plugins-file", str(path), "--remove"]) == 0
    assert path.read_text() == "my_plugin\n"
    assert (REPO / ".allennlp_plugins").read_text().split() == ["allennlp_analyze.plugin"]


def test_scheduler_option_is_shared(monkeypatch, capsys):
    """``allennlp analyze --scheduler``: the standalone command's option, and its one error
    line where Dask cannot be imported."""
    monkeypatch.setitem(sys.modules, "distributed", None)
    code, out, err = _run_command([str(TAGGER), "--scheduler", "tcp://127.0.0.1:8786"], capsys)
    assert (code, out) == (2, "")
    assert err == ("allennlp analyze: error: --scheduler needs Dask distributed, which is not "
                   "installed: pip install 'allennlp-analyze[dask]'\n")
