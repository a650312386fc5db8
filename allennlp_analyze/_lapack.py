"""The few LAPACK/BLAS routines numpy does not expose, called in numpy's own OpenBLAS.

numpy's ``eigvalsh`` is ``dsytrd`` (reduction to tridiagonal form) followed by ``dsterf``
(eigenvalues of the tridiagonal matrix), and throws the Householder reflectors away. The
near-square path of :mod:`allennlp_analyze.spectrum` needs them (eigenvectors of a few Gram
eigenvalues after the one reduction), the streamed Gram needs ``dsyrk`` accumulating in
place, and large Grams of tall matrices take the cheaper two-stage reduction
(``dsytrd_2stage``, where the library has it). These routines are looked up, through ctypes,
in the OpenBLAS library numpy itself loaded (found by threadpoolctl): the same library, so
``sytrd`` + ``sterf`` give numpy's ``eigvalsh`` bit for bit; ctypes releases the GIL during
each call, so worker threads overlap.

Only OpenBLAS builds are used, because their ``openblas_get_config()`` states the integer width
(``USE64BITINT``) that the symbols' names (``dsytrd_`` / ``dsytrd_64_``, with or without the
``scipy_`` prefix of numpy's wheels) imply; anywhere else :func:`backend` is None and the
callers keep to numpy (the Gram eigenvalues, else the SVD).

All matrices are float64 in Fortran order; a C-ordered symmetric array is its own transpose, so
"lower" here is the upper triangle of the C array. Every routine works in place where LAPACK does.
"""

import ctypes
import os
from typing import Dict, Optional, Tuple

import numpy as np

_SIZE1 = ctypes.c_size_t(1)  # hidden length of a Fortran CHARACTER*1 argument


class Lapack:
    """Function pointers of one OpenBLAS library and its Fortran integer type."""

    def __init__(self, lib: ctypes.CDLL, prefix: str, suffix: str, int64: bool):
        self.path = lib._name
        self._int = ctypes.c_int64 if int64 else ctypes.c_int32
        self._idtype = np.int64 if int64 else np.int32
        self._fns = {}
        for name in ("dsyrk", "dgemm", "dsytrd", "dsterf", "dstein", "dormtr"):
            fn = getattr(lib, f"{prefix}{name}_{suffix}")
            fn.restype = None
            self._fns[name] = fn
        two_stage = getattr(lib, f"{prefix}dsytrd_2stage_{suffix}", None)  # LAPACK >= 3.7
        if two_stage is not None:
            two_stage.restype = None
            self._fns["dsytrd_2stage"] = two_stage

    @property
    def two_stage(self) -> bool:
        """Whether :meth:`eigenvalues_2stage` is available."""
        return "dsytrd_2stage" in self._fns

    def _i(self, v: int):
        return ctypes.byref(self._int(v))

    def gram_update(self, G: np.ndarray, B: np.ndarray, c0: int, c1: int, beta: float) -> None:
        """Columns ``c0:c1`` of the lower triangle of G (M x M, Fortran view) ``= beta * G +
        B^T B`` for a C-ordered row block B (r x M, float64): ``dsyrk`` on the diagonal
        block, ``dgemm`` below it. Any column split gives the same values as long as the
        split is the same (each entry is one call's dot product)."""
        r, M = B.shape
        n = c1 - c0
        if n <= 0 or r == 0:
            return
        one, b = ctypes.byref(ctypes.c_double(1.0)), ctypes.byref(ctypes.c_double(beta))
        base_b, base_g = B.ctypes.data, G.ctypes.data
        self._fns["dsyrk"](
            b"L",
            b"N",
            self._i(n),
            self._i(r),
            one,
            ctypes.c_void_p(base_b + 8 * c0),
            self._i(M),
            b,
            ctypes.c_void_p(base_g + 8 * (c0 + c0 * M)),
            self._i(M),
            _SIZE1,
            _SIZE1,
        )
        if c1 < M:
            self._fns["dgemm"](
                b"N",
                b"T",
                self._i(M - c1),
                self._i(n),
                self._i(r),
                one,
                ctypes.c_void_p(base_b + 8 * c1),
                self._i(M),
                ctypes.c_void_p(base_b + 8 * c0),
                self._i(M),
                b,
                ctypes.c_void_p(base_g + 8 * (c1 + c0 * M)),
                self._i(M),
                _SIZE1,
                _SIZE1,
            )

    def sytrd(self, G: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Reduce symmetric G (lower triangle) to tridiagonal T = Q^T G Q in place: returns T's
        diagonal ``d``, off-diagonal ``e`` and the reflectors' ``tau`` (G then holds the
        reflectors, for :meth:`ormtr`)."""
        n = G.shape[0]
        d, e, tau = np.empty(n), np.empty(max(n - 1, 1)), np.empty(max(n - 1, 1))
        info, query = self._int(0), np.empty(1)
        args = (b"L", self._i(n), _ptr(G), self._i(n), _ptr(d), _ptr(e), _ptr(tau))
        self._fns["dsytrd"](*args, _ptr(query), self._i(-1), ctypes.byref(info), _SIZE1)
        lwork = max(1, int(query[0]))
        work = np.empty(lwork)
        self._fns["dsytrd"](*args, _ptr(work), self._i(lwork), ctypes.byref(info), _SIZE1)
        _check("dsytrd", info)
        return d, e[: n - 1], tau[: n - 1]

    def eigenvalues_2stage(self, G: np.ndarray) -> np.ndarray:
        """All eigenvalues of symmetric G (lower triangle), ascending: the two-stage reduction
        (``dsytrd_2stage``: to band form by BLAS-3 blocks, then bulge chasing to tridiagonal,
        backward stable as ``dsytrd``) and ``dsterf``. G is overwritten and no reflectors are
        kept (LAPACK has no back-transformation for them)."""
        n = G.shape[0]
        d, e, tau = np.empty(n), np.empty(max(n, 1)), np.empty(max(n, 1))
        info, query, hquery = self._int(0), np.empty(1), np.empty(1)
        head = (b"N", b"L", self._i(n), _ptr(G), self._i(n), _ptr(d), _ptr(e), _ptr(tau))
        fn = self._fns["dsytrd_2stage"]
        fn(
            *head,
            _ptr(hquery),
            self._i(-1),
            _ptr(query),
            self._i(-1),
            ctypes.byref(info),
            _SIZE1,
            _SIZE1,
        )
        lhous, lwork = max(1, int(hquery[0])), max(1, int(query[0]))
        hous, work = np.empty(lhous), np.empty(lwork)
        fn(
            *head,
            _ptr(hous),
            self._i(lhous),
            _ptr(work),
            self._i(lwork),
            ctypes.byref(info),
            _SIZE1,
            _SIZE1,
        )
        _check("dsytrd_2stage", info)
        return self.sterf(d, e[: n - 1])

    def sterf(self, d: np.ndarray, e: np.ndarray) -> np.ndarray:
        """All eigenvalues of the tridiagonal (d, e), ascending (inputs kept)."""
        w, work, info = np.array(d, dtype=np.float64), np.array(e, dtype=np.float64), self._int(0)
        if w.size > 1:
            self._fns["dsterf"](self._i(w.size), _ptr(w), _ptr(work), ctypes.byref(info))
            _check("dsterf", info)
        return w

    def stein(self, d: np.ndarray, e: np.ndarray, w: np.ndarray) -> Optional[np.ndarray]:
        """Eigenvectors of the tridiagonal (d, e) for its eigenvalues ``w`` (ascending, as from
        :meth:`sterf`) by inverse iteration, orthogonalized within clusters: a C-ordered k x n
        array (row j = vector j), or None where some vector did not converge."""
        n, k = d.size, w.size
        ee = np.zeros(n)
        ee[: n - 1] = e
        Z = np.zeros((k, n))
        iblock = np.ones(k, dtype=self._idtype)
        isplit = np.array([n], dtype=self._idtype)
        work, iwork = np.empty(5 * n), np.empty(n, dtype=self._idtype)
        ifail, info = np.empty(k, dtype=self._idtype), self._int(0)
        d, w = np.ascontiguousarray(d, dtype=np.float64), np.ascontiguousarray(w, dtype=np.float64)
        self._fns["dstein"](
            self._i(n),
            _ptr(d),
            _ptr(ee),
            self._i(k),
            _ptr(w),
            _ptr(iblock),
            _ptr(isplit),
            _ptr(Z),
            self._i(n),
            _ptr(work),
            _ptr(iwork),
            _ptr(ifail),
            ctypes.byref(info),
        )
        if info.value > 0:
            return None
        _check("dstein", info)
        return Z

    def ormtr(self, G: np.ndarray, tau: np.ndarray, Zt: np.ndarray) -> np.ndarray:
        """``Q Z`` in place for the reflectors left in G by :meth:`sytrd` and Z given as a
        C-ordered k x n array (its rows are Z's columns): returns ``Zt``, now ``(Q Z)^T``."""
        k, n = Zt.shape
        info, query = self._int(0), np.empty(1)
        tau = np.ascontiguousarray(tau) if tau.size else np.zeros(1)
        args = (
            b"L",
            b"L",
            b"N",
            self._i(n),
            self._i(k),
            _ptr(G),
            self._i(n),
            _ptr(tau),
            _ptr(Zt),
            self._i(n),
        )
        self._fns["dormtr"](
            *args, _ptr(query), self._i(-1), ctypes.byref(info), _SIZE1, _SIZE1, _SIZE1
        )
        lwork = max(1, int(query[0]))
        work = np.empty(lwork)
        self._fns["dormtr"](
            *args, _ptr(work), self._i(lwork), ctypes.byref(info), _SIZE1, _SIZE1, _SIZE1
        )
        _check("dormtr", info)
        return Zt


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)


def _check(name: str, info) -> None:
    if info.value != 0:
        raise RuntimeError(f"LAPACK {name} failed (info {info.value})")


_CACHE: Dict[str, Optional[Lapack]] = {}


def backend() -> Optional[Lapack]:
    """numpy's OpenBLAS as a :class:`Lapack`, or None where it cannot be found and trusted
    (no threadpoolctl, another BLAS, unknown symbol names). Looked up once."""
    if "lapack" not in _CACHE:
        _CACHE["lapack"] = _find()
    return _CACHE["lapack"]


def _find() -> Optional[Lapack]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    numpy_dir = os.path.dirname(os.path.dirname(np.__file__))
    libs = [i for i in threadpool_info() if i.get("internal_api") == "openblas"]
    # numpy's own library first (numpy.libs/ of the wheel, or what numpy links to)
    libs.sort(key=lambda i: not str(i.get("filepath", "")).startswith(numpy_dir))
    for info in libs:
        try:
            lib = ctypes.CDLL(info["filepath"])
        except OSError:
            continue
        for prefix in ("scipy_", ""):
            for suffix in ("64_", ""):
                config = getattr(lib, f"{prefix}openblas_get_config{suffix}", None)
                if config is None or not hasattr(lib, f"{prefix}dsytrd_{suffix}"):
                    continue
                config.restype = ctypes.c_char_p
                int64 = b"USE64BITINT" in (config() or b"")
                if int64 != (suffix == "64_"):
                    continue
                try:
                    return Lapack(lib, prefix, suffix, int64)
                except AttributeError:
                    continue
    return None
