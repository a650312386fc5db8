"""Hugging Face hub ids as sources: a cache tree laid out as huggingface_hub lays it out (two
revisions, refs, snapshots whose files are relative symlinks into blobs/) built from the real
MiniLM files, resolved offline by the standalone command, the API, ``--sources-from`` and
``allennlp analyze``, with records equal to those of the snapshot folder; a local hub served on
127.0.0.1 for the downloads (only config and weight files fetched, safetensors preferred, the
sharded index honoured); and the one-line errors of ids neither cached nor reachable."""
import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from conftest import serving
from safetensors.numpy import load_file, save_file

from allennlp_analyze import analyze
from allennlp_analyze.errors import AnalyzeError
from allennlp_analyze.sources.hub import parse_hub_id, weight_files

REPO_ID = "sentence-transformers/all-MiniLM-L6-v2"
MAIN = hashlib.sha1(b"main commit").hexdigest()
OLD = hashlib.sha1(b"old commit").hexdigest()
#: Two MiniLM matrices (and a bias, not a matrix) as the older revision's weights.
OLD_TENSORS = ("encoder.layer.0.intermediate.dense.weight", "encoder.layer.0.output.dense.weight",
               "encoder.layer.0.output.dense.bias")
CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens, a connection is refused


def _put(repo_dir: Path, commit: str, name: str, source: Path) -> None:
    """``snapshots/<commit>/<name>`` as a relative symlink to ``blobs/<sha256>`` (one blob per
    content, shared between revisions), as huggingface_hub stores downloads."""
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    blob = repo_dir / "blobs" / digest
    blob.parent.mkdir(parents=True, exist_ok=True)
    if not blob.exists():
        shutil.copyfile(source, blob)
    link = repo_dir / "snapshots" / commit / name
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(blob, link.parent), link)


@pytest.fixture(scope="module")
def hub_cache(minilm_path, tmp_path_factory):
    """A hub cache holding MiniLM at ``main`` (config, weights, tokenizer) and an older commit,
    tagged ``v1``, whose weights are three of MiniLM's tensors, the first one halved."""
    root = tmp_path_factory.mktemp("hf") / "hub"
    repo_dir = root / ("models--" + REPO_ID.replace("/", "--"))
    model_dir = minilm_path.parent
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        _put(repo_dir, MAIN, name, model_dir / name)
    full = load_file(str(minilm_path))
    old = {name: full[name] for name in OLD_TENSORS}
    old[OLD_TENSORS[0]] = old[OLD_TENSORS[0]] * np.float32(0.5)
    old_file = root.parent / "old.safetensors"
    save_file(old, str(old_file))
    _put(repo_dir, OLD, "config.json", model_dir / "config.json")
    _put(repo_dir, OLD, "model.safetensors", old_file)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(MAIN)  # no newline, as huggingface_hub writes it
    (repo_dir / "refs" / "v1").write_text(OLD)
    assert (repo_dir / "snapshots" / MAIN / "model.safetensors").is_symlink()
    return root, repo_dir, old


def _without_model(dicts):
    return [{k: v for k, v in d.items() if k != "model"} for d in dicts]


@pytest.fixture
def offline_env(hub_cache, monkeypatch, tmp_path):
    """This process resolves against the fake cache, offline, from an empty working folder."""
    root = hub_cache[0]
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", CLOSED)
    monkeypatch.chdir(tmp_path)
    return root


def _cli(args, env, cwd, executable=None, timeout=120):
    cmd = [executable] if executable else [sys.executable, "-m", "allennlp_analyze"]
    return subprocess.run(cmd + list(args), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONWARNINGS="ignore", **env))


# ---------------------------------------------------------------------------------------------
# The warm cache, no network


def test_standalone_command_reads_a_cached_hub_id_offline(hub_cache, minilm_path, tmp_path):
    """``allennlp-analyze sentence-transformers/all-MiniLM-L6-v2`` with HF_HUB_OFFLINE=1 (and a
    hub address where nothing listens): the records of the snapshot folder, labelled by the id."""
    root, repo_dir, _ = hub_cache
    script = Path(sys.executable).parent / "allennlp-analyze"
    p = _cli([REPO_ID, "--format", "json"], {"HF_HUB_CACHE": str(root), "HF_HUB_OFFLINE": "1",
                                              "HF_ENDPOINT": CLOSED}, tmp_path, str(script))
    assert p.returncode == 0, p.stderr
    records = json.loads(p.stdout)["records"]
    expected = analyze(str(repo_dir / "snapshots" / MAIN)).to_dicts()
    assert len(records) == 12 and {r["model"] for r in records} == {REPO_ID}
    assert _without_model(records) == _without_model(expected)
    # and the snapshot holds the real MiniLM weights
    assert _without_model(records) == _without_model(analyze(str(minilm_path)).to_dicts())


def test_revisions_by_tag_and_commit_through_sources_from_without_offline_flag(hub_cache,
                                                                               tmp_path):
    """Tag and commit hash name the older snapshot; with HF_HUB_OFFLINE unset a cached id is
    still read without the network (the hub address refuses every connection)."""
    root, repo_dir, old = hub_cache
    listing = tmp_path / "sources.txt"
    listing.write_text(f"# two revisions\n{REPO_ID}@v1\n{REPO_ID}@{OLD}\n{REPO_ID}\n")
    p = _cli(["--sources-from", str(listing), "--format", "json", "--min-q", "1",
              "--match", r"layer\.0\."],
             {"HF_HUB_CACHE": str(root), "HF_ENDPOINT": CLOSED}, tmp_path)
    assert p.returncode == 0, p.stderr
    records = json.loads(p.stdout)["records"]
    by_model = {}
    for r in records:
        by_model.setdefault(r["model"], []).append(r)
    assert list(by_model) == [f"{REPO_ID}@v1", f"{REPO_ID}@{OLD}", REPO_ID]
    expected_old = analyze(str(repo_dir / "snapshots" / OLD), min_q=1,
                           match=[r"layer\.0\."]).to_dicts()
    for label in (f"{REPO_ID}@v1", f"{REPO_ID}@{OLD}"):
        assert _without_model(by_model[label]) == _without_model(expected_old)
    # the older revision's weights, checked against numpy: the halved matrix's largest value
    first = by_model[f"{REPO_ID}@v1"][0]
    assert first["name"] == OLD_TENSORS[0]
    sv = np.linalg.svd(old[OLD_TENSORS[0]].astype(np.float64), compute_uv=False)
    assert first["sv_max"] == pytest.approx(sv[0], rel=1e-12)
    assert len(by_model[REPO_ID]) == 6  # main: all of MiniLM's layer 0 (q, k, v, o, ffn x 2)


@pytest.fixture(scope="module")
def analyze_archives():
    """``allennlp analyze``'s API, imported before a test's environment points the Hugging Face
    cache elsewhere (transformers, which AllenNLP imports, looks the cache over when imported)."""
    pytest.importorskip("allennlp")
    from allennlp_analyze.plugin import analyze_archives

    return analyze_archives


def test_api_and_allennlp_analyze_resolve_the_id(analyze_archives, offline_env, hub_cache):
    snapshot = analyze(str(hub_cache[1] / "snapshots" / MAIN)).to_dicts()
    api = analyze(REPO_ID)
    assert api.summary.models == [REPO_ID]
    assert _without_model(api.to_dicts()) == _without_model(snapshot)
    plugin = analyze_archives(REPO_ID)
    assert plugin.summary.models == [REPO_ID]
    assert _without_model(plugin.to_dicts()) == _without_model(snapshot)


def test_a_local_path_of_the_same_name_wins(offline_env, hub_cache, tmp_path):
    local = tmp_path / "work" / REPO_ID
    local.mkdir(parents=True)
    save_file({OLD_TENSORS[1]: hub_cache[2][OLD_TENSORS[1]]}, str(local / "model.safetensors"))
    os.chdir(local.parents[1])
    result = analyze(REPO_ID)
    assert [r.name for r in result.records] == [OLD_TENSORS[1]]
    assert result.summary.models == ["all-MiniLM-L6-v2"]  # a folder's label: its name


def test_uncached_id_offline_is_one_line(hub_cache, tmp_path):
    p = _cli(["nobody/no-such-model"], {"HF_HUB_CACHE": str(hub_cache[0]),
                                         "HF_HUB_OFFLINE": "1"}, tmp_path)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("allennlp-analyze: error: nobody/no-such-model is not a local "
                               "path, and it is not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE" in lines[0] and "Traceback" not in p.stderr


def test_uncached_revision_and_missing_local_file(offline_env):
    with pytest.raises(AnalyzeError, match=r"@v9 is not a local path, and it is not in the "
                                           r"Hugging Face cache"):
        analyze(f"{REPO_ID}@v9")
    # a name with a weights file's suffix stays a path
    with pytest.raises(AnalyzeError, match=r"runs/model\.safetensors does not exist"):
        analyze("runs/model.safetensors")


def test_parse_hub_id():
    assert parse_hub_id("org/name") == ("org/name", None)
    assert parse_hub_id("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_hub_id("org/name@refs/pr/3") == ("org/name", "refs/pr/3")
    for not_an_id in ("name", "/abs/path", "./org/name", "a/b/c", "org/na--me", "org/x.git",
                      "org/model.bin", "org/name@", "~/name", "org/-name", "org/name-"):
        assert parse_hub_id(not_an_id) is None, not_an_id


# ---------------------------------------------------------------------------------------------
# Downloads from a hub served here


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Hub(http.server.SimpleHTTPRequestHandler):
    """The two endpoints huggingface_hub uses: ``/api/models/<id>[/revision/<rev>]`` (file
    listing and commit) and ``/<id>/resolve/<rev>/<file>`` (HEAD: commit, ETag, size; GET:
    the bytes). ``repos``: id -> {file name: bytes}; every GET of a file is logged."""

    repos: dict = {}
    log: list = []

    def log_message(self, *args):
        pass

    def _send(self, code, body=b"", headers=()):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    def _answer(self):
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"]:
            repo = "/".join(parts[2:4])
            if repo not in self.repos:
                return self._send(404, b"{}", [("X-Error-Code", "RepoNotFound")])
            if parts[4:5] == ["revision"] and parts[5] != "main":
                return self._send(404, b"{}", [("X-Error-Code", "RevisionNotFound")])
            files = self.repos[repo]
            body = json.dumps({"id": repo, "sha": _commit(repo),
                               "siblings": [{"rfilename": n} for n in files]}).encode()
            return self._send(200, body, [("Content-Type", "application/json")])
        repo, name = "/".join(parts[:2]), "/".join(parts[4:])
        if parts[2:3] != ["resolve"] or name not in self.repos.get(repo, {}):
            return self._send(404, b"", [("X-Error-Code", "EntryNotFound")])
        data = self.repos[repo][name]
        if self.command == "GET":
            type(self).log.append(f"{repo}/{name}")
        self._send(200, data, [("X-Repo-Commit", _commit(repo)), ("ETag", f'"{_sha(data)}"')])

    do_GET = do_HEAD = _answer


def _commit(repo: str) -> str:
    return hashlib.sha1(repo.encode()).hexdigest()


@pytest.fixture(scope="module")
def fake_hub(minilm_path, tmp_path_factory):
    """``org/single``: one safetensors file among a .bin, TensorFlow and ONNX copies;
    ``org/sharded``: a safetensors index and two shards beside a sharded .bin."""
    full = load_file(str(minilm_path))
    tmp = tmp_path_factory.mktemp("hubfiles")
    names = [n for n in full if n.startswith("encoder.layer.0.")]
    first, second = names[: len(names) // 2], names[len(names) // 2:]
    blobs = {}
    for key, subset in (("single", names), ("shard1", first), ("shard2", second)):
        save_file({n: full[n] for n in subset}, str(tmp / f"{key}.safetensors"))
        blobs[key] = (tmp / f"{key}.safetensors").read_bytes()
    config = (minilm_path.parent / "config.json").read_bytes()
    index = {"metadata": {}, "weight_map": {
        **{n: "model-00001-of-00002.safetensors" for n in first},
        **{n: "model-00002-of-00002.safetensors" for n in second}}}
    junk = b"not fetched"
    repos = {
        "org/single": {"config.json": config, "model.safetensors": blobs["single"],
                       "pytorch_model.bin": junk, "tf_model.h5": junk,
                       "onnx/model.onnx": junk, "README.md": junk},
        "org/sharded": {"config.json": config,
                        "model.safetensors.index.json": json.dumps(index).encode(),
                        "model-00001-of-00002.safetensors": blobs["shard1"],
                        "model-00002-of-00002.safetensors": blobs["shard2"],
                        "pytorch_model.bin.index.json": junk,
                        "pytorch_model-00001-of-00002.bin": junk},
    }
    from hostile_inputs import keras_sharded_hostile

    keras = keras_sharded_hostile(tmp / "keras")["good"].parent
    repos["org/keras"] = {f.name: f.read_bytes() for f in sorted(keras.iterdir())}
    repos["org/keras"]["README.md"] = junk
    repos["org/globby"] = {"m.weights.json": json.dumps(
        {"weight_map": {"/layers/dense/vars": "*"}}).encode(), "big.dat": junk}
    with serving(tmp, type("Hub", (_Hub,), {"repos": repos})) as (base, log):
        yield base, repos, log, tmp


def _go_online(monkeypatch, tmp_path, endpoint):
    """This process as one started online: huggingface_hub reads HF_HUB_OFFLINE when imported
    (an earlier test may have set it) and keeps one HTTP session per thread, made then."""
    import huggingface_hub.constants
    import huggingface_hub.utils

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.chdir(tmp_path)
    huggingface_hub.utils.reset_sessions()


@pytest.fixture
def online_env(fake_hub, monkeypatch, tmp_path):
    base, repos, log, _ = fake_hub
    _go_online(monkeypatch, tmp_path, base)
    log.clear()
    yield tmp_path / "hub"
    import huggingface_hub.utils

    huggingface_hub.utils.reset_sessions()


def test_download_fetches_config_and_safetensors_only_then_reads_offline(online_env, fake_hub,
                                                                         monkeypatch):
    _, repos, log, tmp = fake_hub
    result = analyze("org/single", min_q=1)
    assert sorted(log) == ["org/single/config.json", "org/single/model.safetensors"]
    expected = analyze(str(tmp / "single.safetensors"), min_q=1).to_dicts()
    assert _without_model(result.to_dicts()) == _without_model(expected)
    repo_dir = online_env / "models--org--single"
    assert (repo_dir / "refs" / "main").read_text() == _commit("org/single")
    assert sorted(p.name for p in (repo_dir / "snapshots" / _commit("org/single")).iterdir()) \
        == ["config.json", "model.safetensors"]
    # now cached: read again with no request, also offline
    log.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = analyze("org/single", min_q=1)
    assert log == [] and again.to_dicts() == result.to_dicts()


def test_standalone_command_downloads_the_sharded_index_and_its_shards(fake_hub, tmp_path):
    base, repos, log, tmp = fake_hub
    log.clear()
    p = _cli(["org/sharded", "--format", "json", "--min-q", "1"],
             {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": base}, tmp_path)
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)["records"]
    assert sorted(log) == ["org/sharded/config.json", "org/sharded/model-00001-of-00002.safetensors",
                           "org/sharded/model-00002-of-00002.safetensors",
                           "org/sharded/model.safetensors.index.json"]
    expected = analyze(str(tmp / "single.safetensors"), min_q=1).to_dicts()
    assert _without_model(result) == _without_model(expected)
    assert {r["model"] for r in result} == {"org/sharded"}


def test_keras_sharded_weights_from_the_hub(online_env, fake_hub):
    """A repository of Keras sharded weights: the ``*.weights.json`` index and the shards it
    names are fetched (nothing else), and read as the local folder."""
    _, repos, log, tmp = fake_hub
    result = analyze("org/keras", min_q=1)
    assert sorted(log) == ["org/keras/m.weights.json", "org/keras/m_00000.weights.h5",
                           "org/keras/m_00001.weights.h5"]
    expected = analyze(str(tmp / "keras" / "good" / "m.weights.json"), min_q=1).to_dicts()
    assert _without_model(result.to_dicts()) == _without_model(expected) and expected

def test_shard_names_are_no_globs(online_env, fake_hub):
    """An index naming its shard ``*`` fetches a file named ``*`` (there is none: one error
    line), never the whole repository: names are matched literally."""
    _, repos, log, tmp = fake_hub
    with pytest.raises(AnalyzeError, match=r"does not exist"):
        analyze("org/globby")
    assert log == ["org/globby/m.weights.json"]

def test_unknown_model_and_revision_on_the_hub(online_env):
    with pytest.raises(AnalyzeError, match=r"^org/absent is not a local path, and not cached; "
                                           r"the Hugging Face hub has no such model"):
        analyze("org/absent")
    with pytest.raises(AnalyzeError, match=r"no such revision"):
        analyze("org/single@v7")


def test_unreachable_hub_fails_fast(monkeypatch, tmp_path):
    """Nothing listening: refused at once; a server that accepts and never answers: the
    HF_HUB_ETAG_TIMEOUT (here 1 s), not a hang."""
    _go_online(monkeypatch, tmp_path, CLOSED)
    with pytest.raises(AnalyzeError, match=r"cannot reach the Hugging Face hub: connection "
                                           r"refused"):
        analyze("org/model")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
        start = time.monotonic()
        with pytest.raises(AnalyzeError, match=r"cannot reach the Hugging Face hub: timed out"):
            analyze("org/model")
        assert time.monotonic() - start < 10
    finally:
        silent.close()


def test_weight_files_prefers_safetensors_and_skips_subfolders():
    listing = ["config.json", "pytorch_model.bin", "model.safetensors", "onnx/model.onnx",
               "tf_model.h5", "flax_model.msgpack", "tokenizer.json"]
    assert weight_files(listing) == ["config.json", "model.safetensors"]
    assert weight_files(["pytorch_model.bin", "README.md"]) == ["pytorch_model.bin"]
    assert weight_files(["a.safetensors", "b.safetensors", "x.bin"]) == \
        ["a.safetensors", "b.safetensors"]
    assert weight_files(["README.md", "onnx/model.safetensors"]) == []


def test_without_huggingface_hub_an_id_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(AnalyzeError, match=r"^runs/model is not a local path; reading it as a "
                                           r"Hugging Face hub id needs huggingface_hub: pip "
                                           r"install 'allennlp-analyze\[hub\]'$"):
        analyze("runs/model")


def test_a_cached_snapshot_without_weights_is_completed_online_and_refused_offline(
        online_env, fake_hub, monkeypatch):
    """The cache holds only ``config.json`` of org/single (as after loading a config alone):
    offline that is one line; online only the weights are fetched."""
    _, repos, log, tmp = fake_hub
    repo_dir = online_env / "models--org--single"
    config = tmp / "config.json"
    config.write_bytes(repos["org/single"]["config.json"])
    _put(repo_dir, _commit("org/single"), "config.json", config)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(_commit("org/single"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AnalyzeError, match=r"^org/single is not a local path, and its cached "
                                           r"snapshot .* is unusable: .* holds no model weights"
                                           r".*; HF_HUB_OFFLINE forbids downloading it$"):
        analyze("org/single")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    result = analyze("org/single", min_q=1)
    assert log == ["org/single/model.safetensors"]
    expected = analyze(str(tmp / "single.safetensors"), min_q=1).to_dicts()
    assert _without_model(result.to_dicts()) == _without_model(expected)
