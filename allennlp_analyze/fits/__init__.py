"""Every published alpha estimator on one spectrum (numpy only), each equal to its reference:

* ``csn`` (default), ``csn-xmax`` (alias ``xmax``): ``powerlaw`` 1.5's ``Fit``
  (:mod:`.csn_fits`);
* ``xmin-peak``, ``clip-xmax``, ``detx``: WeightWatcher 0.7.7 (:mod:`.ww`);
* ``tpl``: ``powerlaw`` 1.5's truncated power law and its likelihood ratio (:mod:`.truncated`);
* ``hill-mid``, ``hill-peak``: AlphaPruning / TempBalance's ``PL_Alpha_Hill`` (:mod:`.hill`).

Each estimator is a function of the eigenvalues (any order, float64, the weights' units squared)
returning an :class:`~.estimate.Estimate` whose ``status`` says why it has no numbers, if so.
Formulas, sources and differences: ``docs/estimators.md``.
"""

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .csn_fits import csn, csn_xmax
from .estimate import (
    STATUS_TEXT,
    ClippedEstimate,
    DetXEstimate,
    Estimate,
    TruncatedEstimate,
    warning,
)
from .hill import hill_mid, hill_peak
from .truncated import tpl
from .ww import clip_xmax, detx, xmin_peak

#: Estimator name -> function, in the order the docs list them.
ESTIMATORS: Dict[str, Callable[[np.ndarray], Estimate]] = {
    "csn": csn,
    "csn-xmax": csn_xmax,
    "xmin-peak": xmin_peak,
    "clip-xmax": clip_xmax,
    "tpl": tpl,
    "hill-mid": hill_mid,
    "hill-peak": hill_peak,
    "detx": detx,
}
#: Other names accepted for an estimator.
ALIASES = {"xmax": "csn-xmax"}
#: The estimators that take only the eigenvalues above the storage's round-off level (the CSN
#: fit as the original analysis ran it); the others take every eigenvalue and filter as their
#: source does (WeightWatcher: > 1e-5; the Hill estimators: > 0).
FITTED_ONLY = frozenset({"csn", "csn-xmax", "tpl"})


def parse_fits(text: str) -> Tuple[str, ...]:
    """The estimators of a ``--fit`` value (comma-separated, aliases resolved, duplicates
    dropped, order kept). Raises ``ValueError`` naming an unknown or missing estimator."""
    names: List[str] = []
    for part in text.split(","):
        name = ALIASES.get(part.strip(), part.strip())
        if name not in ESTIMATORS:
            raise ValueError(
                f"unknown estimator {part.strip()!r} in --fit (choose from {', '.join(ESTIMATORS)})"
            )
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError("--fit names no estimator")
    return tuple(names)


def estimate_all(
    evals: np.ndarray, names: Sequence[str], fitted: Optional[np.ndarray] = None
) -> Dict[str, Estimate]:
    """Every named estimator on one spectrum: ``evals`` (every eigenvalue), and for those in
    :data:`FITTED_ONLY` ``fitted`` (the ones above round-off; default: ``evals``)."""
    x = np.asarray(evals, dtype=np.float64).ravel()
    f = x if fitted is None else np.asarray(fitted, dtype=np.float64).ravel()
    return {name: ESTIMATORS[name](f if name in FITTED_ONLY else x) for name in names}


def run_warning(estimates: Dict[str, Estimate], first: str) -> str:
    """The record's ``warning``: WeightWatcher's label of the first estimator's alpha, with
    "fingers" added where clip-xmax (if run) removed eigenvalues."""
    labels = [warning(estimates[first])] if first != "clip-xmax" else []
    clip = estimates.get("clip-xmax")
    if clip is not None:
        labels.append(
            warning(clip)
            if first == "clip-xmax"
            else ("fingers" if isinstance(clip, ClippedEstimate) and clip.num_fingers else "")
        )
    return ",".join(filter(None, labels))


def columns(name: str, est: Estimate) -> Dict[str, object]:
    """The record columns of estimator ``name``'s result (``alpha_<name>``, ``xmin_<name>``,
    ``D_<name>`` with dashes as underscores; ``tpl_*``, ``detx_*``, ``clip_xmax_fingers``)."""
    key = name.replace("-", "_")
    if isinstance(est, TruncatedEstimate):
        return {
            "tpl_alpha": est.alpha,
            "tpl_lambda": est.Lambda,
            "tpl_xmin": est.xmin,
            "tpl_R": est.R,
            "tpl_p": est.p,
        }
    out: Dict[str, object] = {f"alpha_{key}": est.alpha, f"xmin_{key}": est.xmin, f"D_{key}": est.D}
    if isinstance(est, ClippedEstimate):
        out["clip_xmax_fingers"] = est.num_fingers
    if isinstance(est, DetXEstimate):
        out.update(detx_num=est.detx_num, detx_val=est.detx_val)
    return out


__all__ = [
    "ALIASES",
    "ESTIMATORS",
    "FITTED_ONLY",
    "STATUS_TEXT",
    "ClippedEstimate",
    "DetXEstimate",
    "Estimate",
    "TruncatedEstimate",
    "clip_xmax",
    "columns",
    "csn",
    "csn_xmax",
    "detx",
    "estimate_all",
    "hill_mid",
    "hill_peak",
    "parse_fits",
    "run_warning",
    "tpl",
    "warning",
    "xmin_peak",
]
