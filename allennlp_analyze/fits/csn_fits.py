"""``csn`` and ``csn-xmax``: the Clauset–Shalizi–Newman fit of ``powerlaw`` 1.5 (the tool's
default alpha), untruncated or bounded at the largest eigenvalue (:mod:`..powerlaw_fit`)."""

from typing import Optional

import numpy as np

from ..powerlaw_fit import PowerLawFit, fit_power_law
from .estimate import Estimate, as_eigenvalues, failed, screen


def from_fit(fit: Optional[PowerLawFit], none_status: str = "too_few") -> Estimate:
    """An :class:`Estimate` from a :class:`PowerLawFit` (``none_status`` where there is none)."""
    if fit is None:
        return failed(none_status)
    return Estimate(status="ok", alpha=fit.alpha, xmin=fit.xmin, D=fit.D, num_tail=fit.num_tail)


def csn(evals: np.ndarray) -> Estimate:
    """``powerlaw.Fit(evals[evals > 0])``: xmin by the KS search over every distinct value."""
    x = as_eigenvalues(evals)
    bad = screen(x)
    return failed(bad) if bad else from_fit(fit_power_law(x[x > 0]))


def csn_xmax(evals: np.ndarray) -> Estimate:
    """``powerlaw.Fit(evals[evals > 0], xmax=max(evals))`` (the CDF truncated at the largest
    eigenvalue; the original study's ``--fit-xmax max``)."""
    x = as_eigenvalues(evals)
    bad = screen(x)
    return failed(bad) if bad else from_fit(fit_power_law(x[x > 0], xmax=float(x[-1])))
