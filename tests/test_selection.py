"""Which parameters become matrices (``selection.plan`` on synthetic tensor lists), why the others
are left out, and that every left-out parameter or part is counted."""
import numpy as np
import pytest

from allennlp_analyze import AnalysisOptions, analyze
from allennlp_analyze.selection import extract, plan
from allennlp_analyze.tensors import TensorInfo


def T(name, *shape, dtype="float32", module_type=None):
    return TensorInfo(name, tuple(shape), dtype, module_type)


def run(tensors, **options):
    """The plan, its matrices by name, and a check that nothing went uncounted: every tensor is
    either planned (whole or by parts) or skipped (whole, or each of its parts)."""
    sel = plan(tensors, AnalysisOptions(**options))
    by_name = {p.name: p for p in sel.plans}
    assert len(by_name) == len(sel.plans)
    return sel, by_name


def skipped_total(sel):
    return sum(sel.skipped.values())


def only_reason(sel, fragment):
    (reason,) = sel.skipped
    assert fragment in reason, reason
    return sel.skipped[reason]


# ---------------------------------------------------------------------------------------------


def test_vectors_and_scalars_are_skipped_with_a_reason():
    tensors = [T("fc.weight", 300, 100), T("fc.bias", 300), T("norm.weight", 100),
               T("scale", ), T("step", 5, 5, dtype="int64")]
    sel, plans = run(tensors)
    assert list(plans) == ["fc.weight"]
    assert sel.skipped["not a matrix (0-D/1-D: biases, norms, scalars)"] == 3
    assert any("int64" in r for r in sel.skipped)
    assert skipped_total(sel) == 4


@pytest.mark.parametrize("tensor", [
    T("encoder.embed_tokens.weight", 30000, 512),  # by the owning module's name
    T("embeddings.word_embeddings.weight", 30522, 384),
    T("text_field_embedder.token_embedder_tokens.weight", 500, 50),
    T("lookup.weight", 1000, 64, module_type="Embedding"),  # by module type
])
def test_embeddings_skipped_by_default_and_kept_on_request(tensor):
    sel, plans = run([tensor])
    assert not plans
    assert only_reason(sel, "embedding") == 1
    sel, plans = run([tensor], include=("embeddings",))
    assert list(plans) == [tensor.name] and not sel.skipped
    assert plans[tensor.name].module_type is not None and "Embedding" in plans[tensor.name].module_type


@pytest.mark.parametrize("shape, min_q, kept", [
    ((100, 100), 1.1, False), ((100, 100), 1.0, True),   # min_q 1 keeps square matrices
    ((110, 100), 1.1, True), ((109, 100), 1.1, False),   # Q >= min_q
    ((100, 300), 3.0, True), ((100, 300), 3.01, False),  # wide: Q = N / M either way
    ((1536, 384), 4.0, True), ((1536, 384), 4.5, False),
])
def test_aspect_ratio_filter(shape, min_q, kept):
    sel, plans = run([T("w", *shape)], min_q=min_q)
    assert bool(plans) == kept
    if not kept:
        assert only_reason(sel, "--min-q") == 1
    else:
        p = plans["w"]
        assert p.shape == shape and p.rows is None and p.position is None


def test_min_dim_filter():
    tensors = [T("thin", 500, 10), T("wide", 16, 800), T("big", 300, 100)]
    sel, plans = run(tensors, min_dim=16)
    assert sorted(plans) == ["big", "wide"]
    assert only_reason(sel, "--min-dim") == 1
    sel, plans = run(tensors, min_dim=10)
    assert sorted(plans) == ["big", "thin", "wide"]


def test_match_and_exclude_regexes():
    names = [f"encoder.layer.{i}.{part}.weight" for i in range(12) for part in ("ffn", "out")]
    tensors = [T(n, 400, 100) for n in names]
    sel, plans = run(tensors, match=(r"layer\.1\.", r"layer\.11\."))
    assert sorted(plans) == sorted(n for n in names if ".1." in n or ".11." in n)
    assert sel.skipped == {"not matched by --match": 20}
    sel, plans = run(tensors, exclude=(r"\.out\.",))
    assert sorted(plans) == sorted(n for n in names if ".ffn." in n)
    assert sel.skipped == {"excluded by --exclude": 12}
    sel, plans = run(tensors, match=(r"layer\.[0-3]\.",), exclude=("ffn",))
    assert sorted(plans) == [f"encoder.layer.{i}.out.weight" for i in range(4)]
    assert skipped_total(sel) == 20


def test_fused_attention_in_proj_whole_or_split():
    E = 64
    tensors = [T("attn.in_proj_weight", 3 * E, E), T("attn.in_proj_bias", 3 * E),
               T("attn.out_proj.weight", E, E)]
    sel, plans = run(tensors)
    assert list(plans) == ["attn.in_proj_weight"]  # 3E x E, Q = 3
    assert plans["attn.in_proj_weight"].shape == (3 * E, E)
    assert plans["attn.in_proj_weight"].module_type == "MultiheadAttention"
    assert skipped_total(sel) == 2  # the bias, and out_proj (Q = 1)

    sel, plans = run(tensors, split_fused=True, min_q=1.0)
    parts = [plans[f"attn.in_proj_weight[{p}]"] for p in "qkv"]
    assert [p.rows for p in parts] == [(0, E), (E, 2 * E), (2 * E, 3 * E)]
    assert [p.part for p in parts] == ["q", "k", "v"] and all(p.shape == (E, E) for p in parts)
    assert "attn.out_proj.weight" in plans and skipped_total(sel) == 1
    full = np.random.default_rng(0).standard_normal((3 * E, E))
    for i, p in enumerate(parts):
        assert np.array_equal(extract(p, full), full[i * E:(i + 1) * E])

    sel, plans = run(tensors, split_fused=True)  # the E x E parts have Q = 1 < 1.1
    assert not plans
    assert sel.skipped["aspect ratio Q below --min-q 1.1"] == 4  # 3 parts and out_proj


@pytest.mark.parametrize("gates, names", [(4, "ifgo"), (3, "rzn")])
def test_recurrent_gate_split(gates, names):
    """LSTM (4 gates) / GRU (3) weights, module type unknown: the gate count comes from
    weight_hh's shape (gates * H x H)."""
    H, I = 32, 100
    tensors = [T("rnn.weight_ih_l0", gates * H, I), T("rnn.weight_hh_l0", gates * H, H),
               T("rnn.bias_ih_l0", gates * H), T("rnn.weight_ih_l0_reverse", gates * H, I),
               T("rnn.weight_hh_l0_reverse", gates * H, H), T("rnn.weight_ih_l1", gates * H, 2 * H)]
    kind = {4: "LSTM", 3: "GRU"}[gates]
    sel, plans = run(tensors, min_q=1.0)
    assert sorted(plans) == sorted(t.name for t in tensors if "bias" not in t.name)
    assert all(p.module_type == kind for p in plans.values())

    sel, plans = run(tensors, min_q=1.0, split_fused=True)
    assert skipped_total(sel) == 1  # the bias
    for t in tensors:
        if "bias" in t.name:
            continue
        parts = [plans[f"{t.name}[{g}]"] for g in names]
        assert [p.rows for p in parts] == [(i * H, (i + 1) * H) for i in range(gates)]
        assert all(p.shape == (H, t.shape[1]) and p.module_type == kind for p in parts)
        full = np.arange(np.prod(t.shape), dtype=np.float32).reshape(t.shape)
        for i, p in enumerate(parts):
            assert np.array_equal(extract(p, full), full[i * H:(i + 1) * H])
    assert len(plans) == gates * 5

    sel, plans = run(tensors, split_fused=True)  # H x H gates of weight_hh: Q = 1
    assert sel.skipped["aspect ratio Q below --min-q 1.1"] == 2 * gates
    assert len(plans) == 3 * gates


def test_convolution_kernels_skipped_by_default_and_sliced_on_request():
    rng = np.random.default_rng(3)
    kernel = rng.standard_normal((96, 64, 3, 2)).astype(np.float32)  # (out, in, kh, kw)
    small = rng.standard_normal((8, 3, 5, 5)).astype(np.float32)
    conv1d = rng.standard_normal((80, 60, 4)).astype(np.float32)
    # a 4-D kernel is a convolution by its shape; a 3-D one by its bias of out-channels
    tensors = [T("conv.weight", *kernel.shape, module_type="Conv2d"), T("conv.bias", 96),
               T("stem.weight", *small.shape), T("c1.weight", *conv1d.shape), T("c1.bias", 80)]
    sel, plans = run(tensors)
    assert not plans
    assert sel.skipped["convolution kernel (add --include conv)"] == 3
    assert skipped_total(sel) == 5

    sel, plans = run(tensors, include=("conv",))
    conv = [p for p in plans.values() if p.param == "conv.weight"]
    assert sorted(p.position for p in conv) == [(i, j) for i in range(3) for j in range(2)]
    assert all(p.shape == (96, 64) and p.module_type == "Conv2d" for p in conv)
    assert [p.position for p in plans.values() if p.param == "c1.weight"] == [(k,) for k in range(4)]
    # the 8 x 3 slices of the stem are below --conv-min-dim 50: 25 slices counted
    assert sel.skipped["convolution slice smaller than --conv-min-dim 50"] == 25
    assert sel.skipped["not a matrix (0-D/1-D: biases, norms, scalars)"] == 2
    for p in conv:
        i, j = p.position
        assert np.array_equal(extract(p, kernel), kernel[:, :, i, j])
        assert p.name == f"conv.weight[{i},{j}]" and p.part == f"{i},{j}"

    # the analysis of each slice: its singular values are those of kernel[:, :, i, j]
    result = analyze({"conv.weight": kernel, "stem.weight": small}, include=("conv",),
                     conv_min_dim=3, keep_spectra=True)
    assert len(result.records) == 6 + 25
    for rec, sv in zip(result.records, result.spectra):
        src = kernel if rec.name.startswith("conv") else small
        i, j = map(int, rec.slice.split(","))
        S = np.linalg.svd(src[:, :, i, j].astype(np.float64), compute_uv=False)
        assert sv == pytest.approx(S, rel=1e-8)
        assert rec.sv_min == pytest.approx(S[-1], rel=1e-8)
        assert (rec.N, rec.M) == (max(src.shape[:2]), min(src.shape[:2]))


@pytest.mark.parametrize("options, n_plans, n_skipped", [
    ({}, 4, 5),
    ({"min_q": 1.0}, 5, 4),
    ({"split_fused": True}, 1, 5 + 4 + 4 + 3),  # the 64 x 64 gates and q/k/v have Q = 1
    ({"split_fused": True, "min_q": 1.0}, 2 + 4 + 4 + 3, 4),
    ({"include": ("conv", "embeddings")}, 5 + 9, 3),  # 3 x 3 kernel: 9 slices of 128 x 64
    ({"match": ("fc",)}, 1, 8),
    ({"exclude": ("lstm",), "min_dim": 65}, 0, 9),
])
def test_every_parameter_or_part_is_planned_or_counted(options, n_plans, n_skipped):
    tensors = [T("emb.weight", 1000, 64, module_type="Embedding"), T("fc1.weight", 256, 64),
               T("fc1.bias", 256), T("fc2.weight", 64, 64), T("ids", 10, 10, dtype="int64"),
               T("conv.weight", 128, 64, 3, 3), T("lstm.weight_ih_l0", 4 * 64, 64),
               T("lstm.weight_hh_l0", 4 * 64, 64), T("attn.in_proj_weight", 192, 64)]
    sel, plans = run(tensors, **options)
    assert (len(sel.plans), skipped_total(sel)) == (n_plans, n_skipped)
    assert all(n > 0 for n in sel.skipped.values())
