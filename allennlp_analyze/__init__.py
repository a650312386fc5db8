"""allennlp-analyze: rank collapse and power-law spectra of trained weight matrices.

The core (``spectrum``, ``powerlaw_fit``, ``records``) needs numpy only; torch is imported only
for pickled weights and modules, AllenNLP only by ``allennlp_analyze.plugin``.
"""

from .api import Analysis, analyze
from .describe import Description, TensorDescription, describe
from .errors import AnalyzeError
from .matrix import analyze_matrix
from .options import AnalysisOptions
from .powerlaw_fit import PowerLawFit, fit_power_law
from .records import MatrixRecord, Summary

__all__ = [
    "Analysis",
    "AnalysisOptions",
    "AnalyzeError",
    "Description",
    "MatrixRecord",
    "PowerLawFit",
    "Summary",
    "TensorDescription",
    "analyze",
    "analyze_matrix",
    "describe",
    "fit_power_law",
]
__version__ = "0.1.0"
