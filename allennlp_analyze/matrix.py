"""One matrix to one record: its spectrum, ranks, norms, noise floor, Marchenko-Pastur bulk and
power-law fit (:func:`analyze_matrix`); :func:`analyze_many` does matrices of one oriented shape
in stacked spectral calls, with the same results as one by one.
"""

from dataclasses import replace
from typing import Dict, List, Optional, Tuple

import numpy as np

from .fits import FITTED_ONLY, Estimate, TruncatedEstimate, columns, estimate_all, run_warning
from .options import AnalysisOptions
from .records import WIDE_DTYPES, MatrixRecord, criterion_for, roundoff_criterion
from .spectral_metrics import (
    effective_rank,
    esd_distance,
    log_alpha_norm,
    matrix_entropy,
    mp_bulk_fit,
    permuted,
)
from .spectrum import Parallel, Spectrum, singular_values_many
from .quantized import QuantizedView, readable
from .tensors import DTYPE_EPS, storage_eps


def analyze_matrix(
    W: np.ndarray,
    options: AnalysisOptions = AnalysisOptions(),
    *,
    name: str = "W",
    dtype: Optional[str] = None,
    model: str = "",
    module_type: Optional[str] = None,
    part: Optional[str] = None,
) -> MatrixRecord:
    """Analyze one 2-D matrix ``W``. ``dtype`` is its storage dtype name (default: W's own),
    whose machine epsilon sets the numpy / Numerical-Recipes rank tolerances and whose ulp the
    noise floor (W's values are taken as stored in it)."""
    return analyze_many([(W, name, dtype, model, module_type, part)], options)[0][0]


def analyze_many(
    items: List[Tuple[np.ndarray, str, Optional[str], str, Optional[str], Optional[str]]],
    options: AnalysisOptions,
    parallel: Optional[Parallel] = None,
) -> List[Tuple[MatrixRecord, np.ndarray, np.ndarray]]:
    """Records of matrices (``(W, name, dtype, model, module_type, part)``, as
    :func:`analyze_matrix` takes them) of one oriented shape, each with its singular values and
    those of its permuted self (empty where none were computed); the spectra computed by
    stacked calls (same results as one by one).
    The storage rounding is accumulated from the row blocks the spectrum reads (no pass of its
    own); ``parallel`` runs a matrix's independent Gram panels (``spectrum.Parallel``)."""
    prepared = [
        _prepare(W, options, name, dtype, model, module_type, part)
        for W, name, dtype, model, module_type, part in items
    ]
    specs = singular_values_many(
        [W for _, W in prepared],
        [storage_eps(rec.dtype) for rec, _ in prepared],
        loose_tol=options.loose_tol,
        method=options.method,
        device=options.device,
        parallel=parallel,
        noise_dtypes=[rec.dtype for rec, _ in prepared],
    )
    results = []
    done: List[Tuple[int, Spectrum]] = []
    for i, ((rec, _), spec) in enumerate(zip(prepared, specs)):
        if spec is None:
            rec.status = "nonfinite"
            results.append((rec, np.zeros(0)))
        else:
            results.append(_finish(rec, spec, options))
            done.append((i, spec))
    rand = [np.zeros(0)] * len(results)
    if options.randomize:
        for (i, _), sv in zip(
            done, _randomize([prepared[i] for i, _ in done], [spec for _, spec in done], options)
        ):
            rand[i] = sv
    return [(rec, sv, r) for (rec, sv), r in zip(results, rand)]


def _prepare(
    W: np.ndarray,
    options: AnalysisOptions,
    name: str,
    dtype: Optional[str],
    model: str,
    module_type: Optional[str],
    part: Optional[str],
) -> Tuple[MatrixRecord, np.ndarray]:
    """The record's identity fields, and W (any array-like that slices; it is read in
    blocks, and NaN/Inf is found there)."""
    W = readable(W)  # a quantized matrix: row blocks decoded with each element's step
    if isinstance(W, QuantizedView):
        dtype = W.matrix.scheme
    if not hasattr(W, "shape"):
        W = np.asarray(W)
    if W.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D matrix, got shape {W.shape}")
    dtype = dtype or W.dtype.name
    if dtype not in DTYPE_EPS and not isinstance(W, QuantizedView):
        raise ValueError(f"{name}: unsupported dtype {dtype}")
    N, M = max(W.shape), min(W.shape)
    rec = MatrixRecord(
        model=model,
        name=name,
        module_type=module_type,
        shape=tuple(W.shape),
        dtype=dtype,
        N=N,
        M=M,
        Q=N / M if M else float("inf"),
        slice=part,
    )
    return rec, W


def _eps_ranks(
    rec: MatrixRecord, spec: Spectrum, bound: Optional[float]
) -> Tuple[Optional[int], Optional[int], Optional[str]]:
    """numpy's and Numerical Recipes' ranks, each None where it says nothing about W, and why.

    Their tolerances scale with nu_max: at or above it (max(N, M) * eps >= 1 for numpy,
    sqrt(N + M + 1) * eps / 2 >= 1 for NR) every value counts as noise. For float16, bfloat16
    and float8 storage (no SVD runs in that precision: eps stands in for the storage rounding)
    a rank is also None where it is below the number of singular values above ``bound``, the
    rigorous bound on the rounding error's spectral norm: by Weyl's inequality each of those is
    the image of a nonzero singular value of the unrounded matrix, so a tolerance that calls
    them noise contradicts the storage it models. float32 / float64 ranks are the formulas."""
    sv, tol = spec.sv, spec.tolerances
    if rec.dtype not in DTYPE_EPS:
        return None, None, f"{rec.dtype} quantization has no machine epsilon: no numpy / nr rank"
    certain = None if rec.dtype in WIDE_DTYPES or bound is None else spec.rank(bound)
    ranks: Dict[str, Optional[int]] = {c: spec.rank(getattr(tol, c)) for c in ("numpy", "nr")}
    at_max = [c for c in ranks if sv[0] > 0.0 and getattr(tol, c) >= sv[0]]
    reasons = (
        [
            f"{' and '.join(at_max)} tolerance >= sv_max for {rec.dtype} "
            f"(eps {DTYPE_EPS[rec.dtype]:.3g}) at {rec.N} x {rec.M}"
        ]
        if at_max
        else []
    )
    for c in ranks:
        if c in at_max:
            ranks[c] = None
        elif certain is not None and (rank := ranks[c]) is not None and rank < certain:
            reasons.append(
                f"{c} tolerance ({getattr(tol, c) / sv[0]:.2g} of sv_max) calls "
                f"{certain - rank} values above the {rec.dtype} rounding-error "
                f"bound ({bound / sv[0]:.2g} of sv_max) noise"
            )
            ranks[c] = None
    note = "; ".join(reasons) + ": no rank" if reasons else None
    return ranks["numpy"], ranks["nr"], note


def _finish(
    rec: MatrixRecord, spec: Spectrum, options: AnalysisOptions
) -> Tuple[MatrixRecord, np.ndarray]:
    """Fill the record from the spectrum and its noise floor (``spec.noise``: the spectrum is
    computed with its storage dtype): ranks, norms, the power-law fit."""
    noise = spec.noise
    if noise is None:
        raise ValueError("the spectrum was computed without its storage noise (noise_dtypes)")
    M = rec.M
    sv, tol = spec.sv, spec.tolerances
    rec.method = spec.method
    rec.sv_max, rec.sv_min = float(sv[0]), float(sv[-1])
    # logs and eigenvalues from the values as computed (W scaled by 2**-exponent): lambda
    # itself may lie outside float64's range (weights of 1e-300 or 1e160)
    unit, shift = spec.unit_sv, 2.0 * spec.exponent * float(np.log10(2.0))
    rec.log10_sv_min = float(np.log10(unit[-1])) + shift / 2 if unit[-1] > 0 else float("-inf")
    rec.rank_loose, rec.rank_noise = spec.rank(tol.loose), spec.rank(tol.noise)
    rec.noise_floor, rec.noise_bound = tol.noise, noise.bound
    rec.rank_numpy, rec.rank_nr, rec.rank_note = _eps_ranks(rec, spec, noise.bound)
    if noise.bound_reason:
        rec.rank_note = "; ".join(
            filter(None, (rec.rank_note, f"no noise_bound: {noise.bound_reason}"))
        )
    rec.rank_criterion = criterion_for(options.rank_criterion, rec.dtype)
    rank = rec.rank(rec.rank_criterion)
    rec.rank_loss = None if rank is None else M - rank
    if sv[0] == 0.0:
        rec.status = "all_zero"
        return rec, sv
    evals = unit**2
    lam_max, lam_sum = float(evals[0]), float(evals.sum())
    rec.stable_rank = lam_sum / lam_max
    rec.log_norm = float(np.log10(lam_sum)) + shift
    rec.log_spectral_norm = float(np.log10(lam_max)) + shift
    # the fit sees every eigenvalue above round-off for the storage dtype, whatever the rank
    # criterion: numpy's tolerance for float32 / float64 (as ever), else the noise floor
    roundoff = roundoff_criterion(rec.dtype)
    fitted = evals[(sv > getattr(tol, roundoff)) & (evals > 0)]
    rec.num_evals = int(fitted.size)
    rec.effective_rank = effective_rank(unit)
    if M == 1:
        rec.status = "single_row"
        return rec, sv
    bulk = mp_bulk_fit(unit, rec.N, M)
    rec.mp_sigma2, rec.lambda_plus = (
        _eigenvalue_units(x, spec.exponent) for x in (bulk.sigma2, bulk.lambda_plus)
    )
    rec.num_spikes, rec.mp_softrank = bulk.num_spikes, bulk.softrank
    rec.entropy = matrix_entropy(unit, spec.rank(getattr(tol, roundoff)))
    # every estimator on this one spectrum: the CSN-type ones on the fitted eigenvalues as the
    # values were computed (scale-free; their xmin converted below), the others on every
    # eigenvalue in the weights' units (their thresholds are absolute)
    with np.errstate(over="ignore", under="ignore"):
        weight_units = sv[::-1] ** 2
    estimates = {
        name: _in_weight_units(name, est, spec.exponent)
        for name, est in estimate_all(weight_units, options.fit, fitted=fitted).items()
    }
    for name, est in estimates.items():
        for key, value in columns(name, est).items():
            setattr(rec, key, value)
    rec.fit = options.fit[0]
    fit = estimates[rec.fit]
    if fit.alpha is None:
        rec.status = "too_few_eigenvalues" if fit.status in ("too_few", "all_equal") else "no_fit"
        return rec, sv
    rec.alpha, rec.D, rec.xmin, rec.num_tail = fit.alpha, fit.D, fit.xmin, fit.num_tail
    if rec.fit == "csn-xmax":
        rec.xmax = _eigenvalue_units(lam_max, spec.exponent)
    rec.warning = run_warning(estimates, rec.fit)
    rec.alpha_weighted = fit.alpha * rec.log_spectral_norm
    rec.log_alpha_norm = log_alpha_norm(unit, fit.alpha) + fit.alpha * shift
    return rec, sv


def _in_weight_units(name: str, est: Estimate, exponent: int) -> Estimate:
    """An estimate of a CSN-type estimator (fitted on the eigenvalues of W scaled by
    2**-exponent) with its eigenvalue fields in the weights' units squared."""
    if name not in FITTED_ONLY or not exponent or est.xmin is None:
        return est
    est = replace(est, xmin=_eigenvalue_units(est.xmin, exponent))
    if isinstance(est, TruncatedEstimate) and est.Lambda is not None:
        est = replace(est, Lambda=float(np.ldexp(est.Lambda, -2 * exponent)))
    return est


def _eigenvalue_units(x: Optional[float], exponent: int) -> Optional[float]:
    """An eigenvalue of the scaled W back in the weights' units squared (x * 4**exponent);
    None where that is outside float64's range."""
    if x is None or not exponent:
        return x
    with np.errstate(over="ignore", under="ignore"):
        value = float(np.ldexp(x, 2 * exponent))
    return value if 0.0 < value < float("inf") else None


def _randomize(
    prepared: List[Tuple[MatrixRecord, np.ndarray]], specs: List[Spectrum], options: AnalysisOptions
) -> List[np.ndarray]:
    """Fill the ``rand_*`` and ``num_traps`` fields of the records that have a bulk fit from
    their matrices with the elements permuted (of one oriented shape, with their spectra
    ``specs``); return the permuted matrices' singular values (empty where none)."""
    keep = [j for j, (rec, _) in enumerate(prepared) if rec.lambda_plus is not None]
    mats = [permuted(np.asarray(prepared[j][1]), options.seed, prepared[j][0].name) for j in keep]
    dtypes = [prepared[j][0].dtype for j in keep]
    # a quantized matrix's permuted values are plain floats: its own noise estimate serves
    estimates = [
        getattr(specs[j].noise, "estimate", 0.0) if d not in DTYPE_EPS else 0.0
        for j, d in zip(keep, dtypes)
    ]
    rand_specs = singular_values_many(
        mats,
        [storage_eps(d) for d in dtypes],
        loose_tol=options.loose_tol,
        method=options.method,
        device=options.device,
        noise_estimates=estimates,
        noise_dtypes=[d if d in DTYPE_EPS else None for d in dtypes],
    )
    out = [np.zeros(0)] * len(prepared)
    for j, rand in zip(keep, rand_specs):
        if rand is None:  # a permutation of finite values is finite
            raise ValueError(f"{prepared[j][0].name}: the permuted matrix is not finite")
        rec = prepared[j][0]
        fit = mp_bulk_fit(rand.unit_sv, rec.N, rec.M)
        rec.rand_sv_max = float(rand.sv[0])
        rec.rand_lambda_plus = _eigenvalue_units(fit.lambda_plus, rand.exponent)
        rec.num_traps = fit.num_spikes
        roundoff = roundoff_criterion(rec.dtype)
        rec.rand_distance = esd_distance(
            specs[j].unit_sv,
            _unit_value(getattr(specs[j].tolerances, roundoff), specs[j]),
            rand.unit_sv,
            _unit_value(getattr(rand.tolerances, roundoff), rand),
        )
        out[j] = rand.sv
    return out


def _unit_value(t: float, spec: Spectrum) -> float:
    """A singular-value threshold in the units of ``spec.unit_sv``."""
    return float(np.ldexp(t, -spec.exponent)) if spec.exponent else t
