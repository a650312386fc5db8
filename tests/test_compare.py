"""--base: pairing two runs' matrices and the change of each, against numpy on W - W_base."""
import io
import json
import math
import multiprocessing
import tarfile
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import pytest

from allennlp_analyze import analyze, cli
from allennlp_analyze.compare import MatrixKey, pair_records
from allennlp_analyze.errors import AnalyzeError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PREFIX = "_text_field_embedder.token_embedder_tokens.transformer_model."
#: The matrices that fine-tuning moved in the archive, and the rank of each change.
MOVED = {"encoder.layer.0.attention.self.query.weight": 3,
         "encoder.layer.1.intermediate.dense.weight": 2}


def _archive(path, state):
    buf = io.BytesIO()
    torch.save(state, buf)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("config.json", b'{"model": {"type": "basic_classifier"}}'),
                           ("weights.th", buf.getvalue())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random tiny BERT encoder saved alone (the base), and an AllenNLP archive whose model
    wraps it (``_text_field_embedder...transformer_model.``) with a classifier head, two of its
    matrices moved by a low-rank change of known rank."""
    d = tmp_path_factory.mktemp("compare")
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=16)
    torch.manual_seed(0)
    encoder = transformers.BertModel(config)
    encoder.save_pretrained(d / "base")
    base = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    rng = np.random.default_rng(1)
    state = {}
    for k, v in base.items():
        if k in MOVED:
            r = MOVED[k]
            u, w = rng.standard_normal((v.shape[0], r)), rng.standard_normal((r, v.shape[1]))
            v = v + torch.from_numpy(0.01 * u @ w).float()
        state[PREFIX + k] = v
    state["_classification_layer.weight"] = torch.randn(3, 32)
    return {"base": d / "base", "archive": _archive(d / "model.tar.gz", state),
            "W": {k[len(PREFIX):]: v.double().numpy() for k, v in state.items()
                  if k.startswith(PREFIX)},
            "W_base": {k: v.double().numpy() for k, v in base.items()}}


@pytest.fixture(scope="module")
def compared(models):
    return analyze(str(models["archive"]), base=str(models["base"]), min_q=1.0)


def test_suffix_matching_pairs_the_wrapped_encoder(compared):
    recs = compared.to_dicts()
    encoder = [r for r in recs if r["name"].startswith(PREFIX)]
    assert encoder and all(r["base_name"] == r["name"][len(PREFIX):] for r in encoder)
    base = compared.summary.base
    assert base.paired == len(encoder) and not base.ambiguous
    # the classifier head has no partner, and is listed
    assert base.unmatched == [f"{compared.summary.models[0]}:_classification_layer.weight"]


def test_fields_equal_numpy_on_the_difference(models, compared):
    by_name = {r["name"][len(PREFIX):]: r for r in compared.to_dicts()
               if r["name"].startswith(PREFIX)}
    for name, rec in by_name.items():
        W, Wb = models["W"][name], models["W_base"][name]
        D = W - Wb
        s_d = np.linalg.svd(D, compute_uv=False)
        s_w, s_b = (np.linalg.svd(X, compute_uv=False) for X in (W, Wb))
        assert rec["delta_rel"] == pytest.approx(np.linalg.norm(D) / np.linalg.norm(Wb),
                                                 rel=1e-12, abs=0)
        assert rec["distance_raw"] == rec["distance_euclidean"] == pytest.approx(
            np.linalg.norm(D), rel=1e-12, abs=0)
        assert rec["delta_sv_max"] == pytest.approx(s_d[0], rel=1e-12, abs=1e-300)
        assert rec["delta_rank"] == MOVED.get(name, 0)
        assert rec["base_sv_below_delta"] == int(np.sum(s_b < s_d[0]))
        assert rec["d_sv_max"] == pytest.approx(s_w[0] - s_b[0], abs=1e-12)
        assert rec["d_sv_min"] == pytest.approx(s_w[-1] - s_b[-1], abs=1e-12)
        cka = np.linalg.norm(W.T @ Wb) / (np.linalg.norm(W.T @ W) * np.linalg.norm(Wb.T @ Wb))
        assert rec["distance_cka"] == pytest.approx(cka, rel=1e-10)
        if name in MOVED:
            assert rec["delta_stable_rank"] == pytest.approx(np.sum(s_d ** 2) / s_d[0] ** 2,
                                                             rel=1e-10)
            p = s_d / s_d.sum()
            p = p[p > 0]
            assert rec["delta_effective_rank"] == pytest.approx(
                math.exp(-np.sum(p * np.log(p))), rel=1e-6)
        else:
            assert rec["delta_rel"] == 0.0 and rec["delta_stable_rank"] is None


def test_alpha_change_is_against_the_base_run(models, compared):
    base = {r["name"]: r for r in analyze(str(models["base"]), min_q=1.0).to_dicts()}
    for rec in compared.to_dicts():
        if rec["base_name"] is not None and rec["alpha"] is not None:
            assert rec["d_alpha"] == pytest.approx(rec["alpha"] - base[rec["base_name"]]["alpha"],
                                                   abs=1e-12)


def test_summary_ranks_by_relative_change(models, compared):
    moved = compared.summary.base.moved
    expected = sorted(MOVED, key=lambda k: -np.linalg.norm(models["W"][k] - models["W_base"][k])
                      / np.linalg.norm(models["W_base"][k]))
    assert [n.split(":", 1)[1][len(PREFIX):] for n, _ in moved[:2]] == expected
    assert all(rel == 0.0 for _, rel in moved[2:])


def test_delta_records_analyze_the_difference(models):
    result = analyze(str(models["archive"]), base=str(models["base"]), delta=True,
                     match=["query"], min_q=1.0)
    deltas = {r["name"]: r for r in result.to_dicts() if r["name"].startswith("delta:")}
    name = "encoder.layer.0.attention.self.query.weight"
    rec = deltas[f"delta:{PREFIX}{name}"]
    s_d = np.linalg.svd(models["W"][name] - models["W_base"][name], compute_uv=False)
    assert rec["sv_max"] == pytest.approx(s_d[0], rel=1e-12)
    assert rec["rank_noise"] == 3 and rec["base_name"] == name
    assert rec["stable_rank"] == pytest.approx(np.sum(s_d ** 2) / s_d[0] ** 2, rel=1e-10)


def test_pairing_never_pairs_ties_or_bare_weight():
    model = [MatrixKey("a.query.weight", (4, 2), None), MatrixKey("head.weight", (4, 2), None),
             MatrixKey("x.y.value.weight", (4, 2), None), MatrixKey("k.weight", (4, 2), None)]
    base = [MatrixKey("l0.query.weight", (4, 2), None), MatrixKey("l1.query.weight", (4, 2), None),
            MatrixKey("y.value.weight", (2, 4), None), MatrixKey("k.weight", (3, 2), None)]
    p = pair_records(model, base)
    assert p.pairs == [(2, 2, True)]
    assert p.ambiguous == {"a.query.weight": ["l0.query.weight", "l1.query.weight"]}
    assert p.unmatched == ["head.weight", "k.weight"]  # "weight" alone; k: other shape
    assert p.unmatched_base == ["l0.query.weight", "l1.query.weight", "k.weight"]
    # two model matrices whose best is one base matrix: neither is paired
    p = pair_records([MatrixKey("a.q.w", (4, 2), None), MatrixKey("b.q.w", (4, 2), None)],
                     [MatrixKey("c.q.w", (4, 2), None)])
    assert p.pairs == [] and set(p.ambiguous) == {"a.q.w", "b.q.w"}


def test_cli_describe_and_errors(models, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli.main([str(models["archive"]), "--base", str(models["base"]), "--format", "json",
                     "-o", str(out), "--no-progress"]) == 0
    doc = json.loads(out.read_text())
    paired = [r for r in doc["records"] if r["base_name"] is not None]
    assert doc["summary"]["base"]["paired"] == len(paired) == 4  # Q >= 1.1: intermediate, output
    assert all("delta_rel" in r for r in doc["records"])
    assert cli.main([str(models["archive"]), "--base", str(models["base"]), "--describe"]) == 0
    text = capsys.readouterr().out
    assert f"{PREFIX}encoder.layer.0.attention.self.query.weight" in text
    assert "unmatched" in text
    assert cli.main([str(models["archive"]), "--delta"]) == 2
    assert capsys.readouterr().err.strip() == "allennlp-analyze: error: --delta needs --base SOURCE"


def test_a_comparison_is_journaled_and_resumed(models, tmp_path, capsys):
    """``--base`` with a sweep file: a resumed run takes the sources already complete from it
    and gives the records and the base summary of an uninterrupted run; the header keeps the
    base (and --delta), so a run against another base is not resumed from it."""
    from allennlp_analyze.journal import HEADER_KEY

    archive, base = str(models["archive"]), str(models["base"])
    journal = tmp_path / "sweep.jsonl"
    fresh = analyze(archive, base, base=base, delta=True, min_q=1.0)
    analyze(archive, base=base, delta=True, min_q=1.0, journal=str(journal))
    resumed = analyze(archive, base, base=base, delta=True, min_q=1.0, journal=str(journal),
                      resume=True)
    assert resumed.to_dicts() == fresh.to_dicts()
    assert resumed.summary.base == fresh.summary.base
    # every matrix of the base pairs once with the archive's encoder and once with itself
    assert fresh.summary.base.paired == 2 * len(analyze(base, min_q=1.0).records)
    header = json.loads(journal.read_text().splitlines()[0])
    assert header[HEADER_KEY] == 1 and header["options"]["base"] == base
    assert header["options"]["delta"] is True
    with pytest.raises(AnalyzeError, match="written with other options .*delta True there"):
        analyze(archive, base=base, min_q=1.0, journal=str(journal), resume=True)
    with pytest.raises(AnalyzeError, match="written with other options .*base"):
        analyze(archive, base=archive, delta=True, min_q=1.0, journal=str(journal), resume=True)
    out = tmp_path / "cli.jsonl"
    assert cli.main([archive, "--base", base, "--format", "jsonl", "-o", str(out),
                     "--no-progress"]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines[0]["options"]["base"] == base
    assert sum(1 for x in lines if x.get("base_name")) == 4


def test_allennlp_subcommand_takes_base(models):
    pytest.importorskip("allennlp")
    from allennlp_analyze.plugin.subcommand import analyze_archives

    plugin = analyze_archives(str(models["archive"]), base=str(models["base"]))
    here = analyze(str(models["archive"]), base=str(models["base"]))
    keys = ("name", "base_name", "delta_rel", "delta_rank", "delta_sv_max")
    assert [{k: r[k] for k in keys} for r in plugin.to_dicts()] == \
        [{k: r[k] for k in keys} for r in here.to_dicts()]


@pytest.mark.parametrize("shape", [(50, 7), (7, 50)])
def test_cross_norm_by_blocks_equals_numpy(monkeypatch, shape):
    """CKA's cross term ‖W1ᵀW2‖_F read a few rows (or columns) at a time, from float32 and
    from a transposed view, equals numpy's float64 product formed whole."""
    from allennlp_analyze import compare

    monkeypatch.setattr(compare, "CROSS_BLOCK_ELEMENTS", 64)  # 9 row blocks / 8 column blocks
    rng = np.random.default_rng(3)
    W1 = rng.standard_normal(shape).astype(np.float32)
    W2 = rng.standard_normal(shape[::-1]).astype(np.float32).T  # a strided view
    want = np.linalg.norm(W1.astype(np.float64).T @ W2.astype(np.float64))
    assert compare.cross_norm(W1, W2) == pytest.approx(want, rel=1e-13)
    assert compare.cross_norm(W1, W1) == pytest.approx(
        np.linalg.norm(W1.astype(np.float64).T @ W1.astype(np.float64)), rel=1e-13)


def test_comparison_does_not_depend_on_the_workers(models, compared):
    """The pairs run on the analysis's workers with BLAS at one thread: every record (base
    fields, ΔW records and their order) is the same, to the bit, with one worker or two."""
    runs = [analyze(str(models["archive"]), base=str(models["base"]), delta=True, min_q=1.0,
                    workers=w).to_dicts() for w in (1, 2)]
    assert [r["name"] for r in runs[0]] == [r["name"] for r in runs[1]]
    assert sum(r["name"].startswith("delta:") for r in runs[0]) == compared.summary.base.paired
    for a, b in zip(*runs):
        assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_comparison_memory_is_checked_before_any_pair(tmp_path, monkeypatch):
    """A pair whose ΔW and its spectrum need more memory than the policy allows is one error
    naming the matrix, raised before any pair is read (the analyses themselves fit)."""
    from safetensors.numpy import save_file

    from allennlp_analyze import limits

    rng = np.random.default_rng(4)
    W = rng.standard_normal((2048, 256)).astype(np.float32)
    save_file({"enc.dense.weight": W}, str(tmp_path / "base.safetensors"))
    save_file({"enc.dense.weight": W + 0.01}, str(tmp_path / "tuned.safetensors"))
    need = limits.comparison_memory(2048, 256)
    assert limits.analysis_memory(2048, 256) < need - 1
    monkeypatch.setenv(limits.ENV_MAX_MEMORY, str(need - 1))
    with pytest.raises(AnalyzeError, match=r"^comparing enc\.dense\.weight \(2048 x 256\) with "
                                           r"its base needs 12\.0 MiB of memory"):
        analyze(str(tmp_path / "tuned.safetensors"), base=str(tmp_path / "base.safetensors"))
    monkeypatch.setenv(limits.ENV_MAX_MEMORY, str(need))
    rec = analyze(str(tmp_path / "tuned.safetensors"),
                  base=str(tmp_path / "base.safetensors")).to_dicts()[0]
    assert rec["distance_raw"] == pytest.approx(0.01 * math.sqrt(W.size), rel=1e-6)


class _Recording(ProcessPoolExecutor):
    """A process pool (forked: the workers see this process's patched ``PART_COST``) that
    notes the name of each task's function."""

    def __init__(self):
        super().__init__(2, mp_context=multiprocessing.get_context("fork"))
        self.calls = []

    def submit(self, fn, *args, **kwargs):
        self.calls.append(fn.__name__)
        return super().submit(fn, *args, **kwargs)


@pytest.fixture(scope="module")
def split_models(tmp_path_factory):
    """Two safetensors models (split into one task per parameter with ``PART_COST`` = 1): a
    tuned one whose matrices pair with the base's by name, by suffix and transposed, two
    (``a.q.w``, ``b.q.w``, in different parts) that both claim the base's ``head.q.w`` (so
    neither pairs: the pairing is the whole source's, not a part's), and a 0/1 mask that is
    left out when read (no record, so it takes no part in the pairing, as locally)."""
    from safetensors.numpy import save_file

    d = tmp_path_factory.mktemp("split")
    rng = np.random.default_rng(7)
    base = {"enc.layer.0.fc.weight": rng.standard_normal((96, 48)),
            "enc.layer.1.fc.weight": rng.standard_normal((96, 48)),
            "enc.layer.0.proj.weight": rng.standard_normal((48, 120)),
            "head.q.w": rng.standard_normal((64, 32))}
    base = {k: v.astype(np.float32) for k, v in base.items()}
    low = rng.standard_normal((96, 2)) @ rng.standard_normal((2, 48))
    tuned = {"model.enc.layer.0.fc.weight": base["enc.layer.0.fc.weight"],
             "enc.layer.1.fc.weight": (base["enc.layer.1.fc.weight"] + 0.01 * low),
             "enc.layer.0.proj.weight": base["enc.layer.0.proj.weight"].T + 0.001,
             "a.q.w": rng.standard_normal((64, 32)), "b.q.w": rng.standard_normal((64, 32)),
             "enc.layer.0.proj.mask": (rng.random((120, 48)) < 0.5)}
    tuned = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tuned.items()}
    save_file(base, str(d / "base.safetensors"))
    save_file(tuned, str(d / "tuned.safetensors"))
    return {"base": str(d / "base.safetensors"), "tuned": str(d / "tuned.safetensors")}


@pytest.mark.parametrize("delta", [False, True])
def test_comparison_on_an_executor_equals_local(models, split_models, monkeypatch, delta):
    """``--base`` on a process pool: an archive (one task), a Hugging Face folder and a
    safetensors model split into parts (analyzed, paired as a whole, compared part by part
    in tasks) give the local run's records (base fields, ΔW records and their order) and
    base summary, to the bit."""
    from allennlp_analyze import tasks

    monkeypatch.setattr(tasks, "PART_COST", 1)  # every parameter a part of its own
    for base, sources in ((str(models["base"]), [str(models["archive"]), str(models["base"])]),
                          (split_models["base"], [split_models["tuned"]])):
        local = analyze(*sources, base=base, delta=delta, min_q=1.0, keep_spectra=True)
        with _Recording() as pool:
            remote = analyze(*sources, base=base, delta=delta, min_q=1.0, keep_spectra=True,
                             executor=pool)
        assert "part_task" in pool.calls and "compare_task" in pool.calls
        assert remote.records == local.records and len(local.records) > 4
        assert [r.to_dict() for r in remote.records] == local.to_dicts()
        assert remote.summary == local.summary and remote.summary.base == local.summary.base
        assert all(np.array_equal(a, b) for a, b in zip(remote.spectra, local.spectra))
        assert len(remote.spectra) == len(local.spectra)
    by_name = {r["name"]: r for r in remote.to_dicts()}
    assert by_name["a.q.w"]["base_name"] is None and by_name["b.q.w"]["base_name"] is None
    assert set(remote.summary.base.ambiguous) == {f"{remote.summary.models[0]}:{k}"
                                                  for k in ("a.q.w", "b.q.w")}
    assert by_name["model.enc.layer.0.fc.weight"]["delta_rel"] == 0.0
    assert by_name["enc.layer.1.fc.weight"]["delta_rank"] == 2
    assert by_name["enc.layer.0.proj.weight"]["base_name"] == "enc.layer.0.proj.weight"
    assert "enc.layer.0.proj.mask" not in by_name
    assert sum(n.startswith("delta:") for n in by_name) == (3 if delta else 0)


def test_executor_needs_the_base_named(models):
    from allennlp_analyze.sources import open_source

    for how in ({"executor": ThreadPoolExecutor(1)}, {"scheduler": "tcp://nowhere:1"}):
        with pytest.raises(ValueError, match="^a run on an executor needs the base named by "
                                             "a path or URL, .* not a "):
            analyze(str(models["archive"]), base=open_source(str(models["base"])), **how)


def test_a_comparison_on_an_executor_is_journaled_as_locally(models, tmp_path):
    """The sweep file of ``--base --delta`` on a process pool is the local run's, byte for
    byte, and a run resumed from it on the pool ends as the local one."""
    archive, base = str(models["archive"]), str(models["base"])
    args = dict(base=base, delta=True, min_q=1.0)
    analyze(archive, base, journal=tmp_path / "local.jsonl", **args)
    with _Recording() as pool:
        analyze(archive, base, journal=tmp_path / "pool.jsonl", executor=pool, **args)
        assert (tmp_path / "pool.jsonl").read_bytes() == (tmp_path / "local.jsonl").read_bytes()
        analyze(archive, journal=tmp_path / "part.jsonl", executor=pool, **args)
        resumed = analyze(archive, base, journal=tmp_path / "part.jsonl", resume=True,
                          executor=pool, **args)
    assert pool.calls.count("source_task") == 4  # the archive's was taken from the sweep file
    assert (tmp_path / "part.jsonl").read_bytes() == (tmp_path / "local.jsonl").read_bytes()
    assert resumed.summary.base == analyze(archive, base, **args).summary.base
