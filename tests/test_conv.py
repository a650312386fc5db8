"""Convolution kernels (--include conv): one out x in matrix per spatial position, checked
against a hand-built reference, with the min-dimension filter and slice-counting aggregates."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from allennlp_analyze import analyze  # noqa: E402
from allennlp_analyze.aggregate import aggregate  # noqa: E402
from allennlp_analyze.sources._common import TensorDictSource  # noqa: E402

OPTS = dict(include=("conv",), min_q=1.0, method="svd")


def net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(52, 60, (3, 2)),      # 6 slices of 60 x 52
        nn.Conv1d(64, 96, 5),           # 5 slices of 96 x 64
        nn.Conv2d(40, 70, 3),           # in = 40 < 50: 9 slices skipped by --conv-min-dim
        nn.Bilinear(60, 70, 80),        # 3-D but not a kernel: never sliced
        nn.Linear(100, 300),
    )


def reference(kernel: np.ndarray):
    """{slice label: singular values} by np.linalg.svd of kernel[:, :, *position]."""
    return {",".join(map(str, pos)): np.linalg.svd(kernel[(slice(None), slice(None)) + pos]
                                                   .astype(np.float64), compute_uv=False)
            for pos in np.ndindex(*kernel.shape[2:])}


def test_conv_slices_match_reference():
    m = net()
    result = analyze(m, keep_spectra=True, **OPTS)
    by_param = {}
    for rec, sv in zip(result.records, result.spectra):
        by_param.setdefault(rec.name.split("[")[0], {})[rec.slice] = (rec, sv)
    assert set(by_param) == {"0.weight", "1.weight", "4.weight"}
    for param, module, n, shape in [("0.weight", m[0], 6, (60, 52)),
                                    ("1.weight", m[1], 5, (96, 64))]:
        ref = reference(module.weight.detach().numpy())
        got = by_param[param]
        assert len(got) == n and set(got) == set(ref)
        for label, (rec, sv) in got.items():
            assert rec.name == f"{param}[{label}]" and rec.shape == shape
            assert rec.module_type == type(module).__name__
            assert (rec.N, rec.M) == (max(shape), min(shape))
            np.testing.assert_allclose(sv, ref[label], rtol=1e-10, atol=1e-12)
            assert rec.sv_min == pytest.approx(ref[label][-1], rel=1e-10)
    skipped = result.summary.skipped
    assert skipped["convolution slice smaller than --conv-min-dim 50"] == 9
    assert any(k.startswith("not a matrix or convolution kernel (3-D, Bilinear)") for k in skipped)

    # the default spectral path (Gram with SVD fallback) agrees to its guaranteed 1e-8
    auto = analyze(m, keep_spectra=True, **{**OPTS, "method": "auto"})
    for a, b in zip(auto.spectra, result.spectra):
        np.testing.assert_allclose(a, b, rtol=1e-8)

    # the same kernels without module types (as from a safetensors file) slice the same way
    state = {k: v for k, v in m.state_dict().items() if not k.startswith("3.")}
    plain = analyze(TensorDictSource("sd", state), **OPTS)
    assert [(r.name, r.sv_min) for r in plain.records] == \
        [(r.name, r.sv_min) for r in result.records]
    assert plain.records[0].module_type == "Conv2d" and plain.records[6].module_type == "Conv1d"


def test_conv_options():
    m = net()
    default = analyze(m, min_q=1.0)
    assert [r.name for r in default.records] == ["4.weight"]
    assert default.summary.skipped["convolution kernel (add --include conv)"] == 3
    lower = analyze(m, **{**OPTS, "conv_min_dim": 40})
    assert sum(r.name.startswith("2.weight[") for r in lower.records) == 9
    # --min-q applies to slices too: 60 x 52 (Q 1.15) stays at 1.1, goes at 1.2
    assert sum(r.name.startswith("0.weight[") for r in analyze(m, include=("conv",)).records) == 6
    assert not any(r.name.startswith("0.weight[")
                   for r in analyze(m, include=("conv",), min_q=1.2).records)


def test_aggregate_counts_slices():
    rng = np.random.default_rng(3)
    kernel = rng.standard_normal((64, 56, 3, 3)).astype(np.float32)
    kernel[:, :, 1, 1] = 0.0          # one dead position: nu_min = 0
    kernel[:, 5, 0, 2] = 0.0          # one rank-deficient position (a zero input column)
    state = {"conv.weight": kernel, "fc.weight": rng.standard_normal((200, 64))}
    result = analyze(TensorDictSource("cnn", state), **OPTS)
    assert len(result.records) == 10
    agg = aggregate(result.records, result.summary.models, -8)
    assert agg.models[0].matrices == agg.total.matrices == 10
    direct = sum(r.log10_sv_min < -8 for r in result.records)
    assert agg.total.below_threshold == direct
    assert direct == 2
    assert {r.slice for r in result.records if r.log10_sv_min < -8} == {"1,1", "0,2"}
