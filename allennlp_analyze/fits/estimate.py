"""What every alpha estimator returns: :class:`Estimate` (and its extensions), its status codes,
and WeightWatcher's warning labels.

Units: ``xmin`` (and every eigenvalue field) in the units of the eigenvalues given, i.e. the
weights' units squared; ``alpha`` is the exponent of the density p(lambda) ~ lambda**-alpha.
"""

from dataclasses import dataclass
from typing import Optional, Type, TypeVar

import numpy as np

#: Status codes. An estimate whose status is not "ok" carries no numbers (all None).
STATUS_TEXT = {
    "ok": "fitted",
    "too_few": "fewer than 2 distinct positive eigenvalues (after the estimator's own filter)",
    "all_equal": "all eigenvalues equal (tpl: its tail within 1e-9 relative): no tail to fit",
    "nonfinite": "NaN or Inf among the eigenvalues (or, tpl, ratios beyond float64): not fitted",
    "negative": "negative eigenvalues (those of W^T W are >= 0): not fitted",
    "no_candidate": "no xmin candidate in the estimator's search range",
}

#: WeightWatcher 0.7.7 ``constants.py``: ``OVER_TRAINED_THRESH = 2.0``,
#: ``UNDER_TRAINED_THRESH = 6.0``; ``fit_powerlaw`` labels ``alpha < 2`` "over-trained" and
#: ``alpha > 6`` "under-trained" (strict inequalities).
OVER_TRAINED_THRESH = 2.0
UNDER_TRAINED_THRESH = 6.0


@dataclass(frozen=True)
class Estimate:
    """One estimator's result on one spectrum. ``alpha``, ``xmin``: the fitted exponent and lower
    cutoff; ``D``: Kolmogorov–Smirnov distance of the tail from the fit, in [0, 1];
    ``num_tail``: eigenvalues >= xmin; all None unless ``status == "ok"``."""

    status: str
    alpha: Optional[float] = None
    xmin: Optional[float] = None
    D: Optional[float] = None
    num_tail: Optional[int] = None


@dataclass(frozen=True)
class ClippedEstimate(Estimate):
    """``clip-xmax``: the fit after removing the top eigenvalues ("fingers").
    ``num_fingers``: WeightWatcher's count (eigenvalues removed minus one, as it reports it);
    ``raw_alpha``: the alpha before any removal."""

    num_fingers: Optional[int] = None
    raw_alpha: Optional[float] = None


@dataclass(frozen=True)
class TruncatedEstimate(Estimate):
    """``tpl``: p(x) ~ x**-alpha exp(-Lambda x) for x >= xmin (``Lambda`` in 1 / eigenvalue
    units); ``loglik``: its log-likelihood on the tail (natural log, densities in 1 / eigenvalue
    units); ``R``, ``p``: ``powerlaw``'s nested likelihood-ratio test of the power law against it
    (R = loglik(power law) - loglik(TPL) <= 0; p = P(chi2_1 > 2|R|))."""

    Lambda: Optional[float] = None
    loglik: Optional[float] = None
    R: Optional[float] = None
    p: Optional[float] = None


@dataclass(frozen=True)
class DetXEstimate(Estimate):
    """``detx``: WeightWatcher's det X = 1 condition. ``detx_num``: eigenvalues in the tail whose
    product (eigenvalues rescaled to mean 1) first drops below 1; ``detx_val``: the smallest of
    them (original units). ``alpha``, ``xmin``, ``D``: the power law fitted with xmin fixed at that
    eigenvalue."""

    detx_num: Optional[int] = None
    detx_val: Optional[float] = None


E = TypeVar("E", bound=Estimate)


def failed(status: str, cls: Type[E] = Estimate) -> E:  # type: ignore[assignment]
    """An estimate without numbers, for a status other than "ok"."""
    assert status in STATUS_TEXT and status != "ok", status
    return cls(status=status)


def screen(evals: np.ndarray) -> Optional[str]:
    """The status that ``evals`` (1-D float64) allow before any estimator looks at them: None if
    a fit may be tried; "nonfinite", "negative", "too_few" or "all_equal" otherwise (the last two
    on the positive ones)."""
    if not np.isfinite(evals).all():
        return "nonfinite"
    if evals.size and evals.min() < 0:
        return "negative"
    positive = evals[evals > 0]
    if positive.size < 2:
        return "too_few"
    if positive.min() == positive.max():
        return "all_equal"
    return None


def as_eigenvalues(evals) -> np.ndarray:
    """``evals`` as a sorted 1-D float64 array (a copy)."""
    return np.sort(np.asarray(evals, dtype=np.float64).ravel())


def warning(est: Estimate) -> str:
    """WeightWatcher's label: "over-trained" (alpha < 2), "under-trained" (alpha > 6), plus
    "fingers" where clip-xmax removed eigenvalues; "" otherwise (and without an alpha)."""
    labels = []
    if est.alpha is not None:
        if est.alpha < OVER_TRAINED_THRESH:
            labels.append("over-trained")
        elif est.alpha > UNDER_TRAINED_THRESH:
            labels.append("under-trained")
    if isinstance(est, ClippedEstimate) and est.num_fingers:
        labels.append("fingers")
    return ",".join(labels)
