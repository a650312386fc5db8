"""Weights behind an http(s) URL: downloaded once into a cache, then opened as a local file; the
one downloader and the one cache rule of both front-ends (the AllenNLP plugin passes AllenNLP's
cache folder).

Cache: ``cache_dir`` argument, else ``$ALLENNLP_ANALYZE_CACHE``, else
``~/.cache/allennlp_analyze``; each URL gets ``<cache>/<sha256(url)[:16]>/<basename>``. Only a
complete, usable weights file is ever cached: the download goes to a private temporary folder,
is checked complete (its Content-Length, and its own format's checks: gzip CRC and length,
safetensors sizes, zip directory, ...) and usable (it opens as a weights source, see
:func:`~allennlp_analyze.sources.open_path`; an index as a checkpoint index), and only then is
renamed into place; every failure (an HTML page, a truncated body, a timeout, Ctrl-C) removes
the temporary folder. A cached file that no longer opens is removed when found (files cached by
older versions), so the next run fetches it again. A URL to a sharded checkpoint's index
(``*.index.json``, Keras's ``*.weights.json``) also fetches the shards it names, from beside it.

Limits (:mod:`allennlp_analyze.limits`): connect timeout; the response headers within the read
timeout, then at least ``MIN_RATE`` bytes/s over each read-timeout window (a watchdog closes a
stalled connection); at most 10 redirects; a size cap and the cache disk's free space;
``Content-Encoding: gzip``/``deflate`` decoded (bounded like an archive), other encodings
refused.
"""

import functools
import hashlib
import http.client
import os
import posixpath
import shutil
import socket
import sys
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path
from typing import Callable, Optional

from .. import limits
from ..errors import AnalyzeError, escape
from . import registry
from ._common import one_line, safe_relative
from .local import open_path

ENV_CACHE = "ALLENNLP_ANALYZE_CACHE"
CHUNK = 1 << 20

#: How many downloads were started in this process (tests use it to see cache hits).
download_count = 0


def cache_root(cache_dir=None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    return Path.home() / ".cache" / "allennlp_analyze"


def url_basename(url: str) -> str:
    path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
    name = posixpath.basename(path.rstrip("/"))
    name = "".join(c if c.isalnum() or c in "._-+" else "_" for c in name).lstrip(".")
    return name or "download"


def cache_path(url: str, cache_dir=None) -> Path:
    digest = hashlib.sha256(url.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return cache_root(cache_dir) / digest / url_basename(url)


def _reason(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        if 300 <= error.code < 400:
            if "infinite loop" in str(error.reason) or "maximum redirection" in str(error.reason):
                return "too many redirects (a redirect loop?)"
            return f"HTTP {error.code} redirect refused ({one_line(error.reason)})"
        return f"HTTP {error.code} {one_line(error.reason)}"
    if isinstance(error, urllib.error.URLError):
        error = error.reason if isinstance(error.reason, BaseException) else error
        if not isinstance(error, BaseException):
            return one_line(error)
    if isinstance(error, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return one_line(error) or type(error).__name__


def _progress_bar(enabled: Optional[bool], total: Optional[int], desc: str):
    if enabled is None:
        enabled = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:
            enabled = False
        else:
            return tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=escape(desc),
                file=sys.stderr,
                leave=False,
            )
    return None


# -- the connection ---------------------------------------------------------------------------


class _Watchdog:
    """Closes the connection when a download stops progressing: the response headers must
    arrive within ``window`` seconds of the request, then every ``window`` seconds must bring
    ``min_bytes`` more (until :meth:`stop`). A blocked read then returns, and the download
    fails as stalled."""

    def __init__(self, window: float, min_bytes: int):
        self.window, self.min_bytes = window, min_bytes
        self.received = 0
        self.expired = False
        self._sock = None
        self._stop = threading.Event()
        self._connected = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def watch(self, sock) -> None:
        """Watch ``sock``, just connected (the first window starts with the first connection)."""
        self._sock = sock
        self._connected.set()

    def advance(self, n: int) -> None:
        self.received += n

    def stop(self) -> None:
        self._stop.set()
        self._connected.set()

    def _run(self) -> None:
        self._connected.wait()
        last = self.received
        while not self._stop.wait(self.window):
            if self.received - last < self.min_bytes:
                self.expired = True
                self._close()
                return
            last = self.received

    def _close(self) -> None:
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _watched(base: type) -> type:
    """``base`` (HTTPConnection / HTTPSConnection) whose connected socket gets the read
    timeout and is handed to the download's watchdog."""

    class Watched(base):
        def __init__(self, *args, watchdog: _Watchdog, **kwargs):
            super().__init__(*args, **kwargs)
            self._watchdog = watchdog

        def connect(self):
            super().connect()
            self.sock.settimeout(limits.read_timeout())
            self._watchdog.watch(self.sock)

    Watched.__name__ = f"Watched{base.__name__}"
    return Watched


_WatchedHTTP = _watched(http.client.HTTPConnection)
_WatchedHTTPS = _watched(http.client.HTTPSConnection)


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, watchdog: _Watchdog):
        super().__init__()
        self.watchdog = watchdog

    def http_open(self, req):
        return self.do_open(functools.partial(_WatchedHTTP, watchdog=self.watchdog), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, watchdog: _Watchdog):
        super().__init__()
        self.watchdog = watchdog

    def https_open(self, req):
        return self.do_open(
            functools.partial(_WatchedHTTPS, watchdog=self.watchdog), req, context=self._context
        )


def _opener(watchdog: _Watchdog) -> urllib.request.OpenerDirector:
    """http(s) only (a redirect elsewhere, ftp or file, is refused), proxies from the
    environment, at most 10 redirects (urllib's rule)."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        _HTTPHandler(watchdog),
        _HTTPSHandler(watchdog),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


# -- one download -----------------------------------------------------------------------------


def _size_cap(folder: Path) -> int:
    """Most bytes a download into ``folder`` may take: the size cap, and the disk's free space
    less ``DISK_MARGIN``."""
    free = shutil.disk_usage(folder).free - limits.DISK_MARGIN
    cap = limits.max_download()
    return max(0, free if cap is None else min(cap, free))


def _too_large(url: str, cap: int) -> AnalyzeError:
    return AnalyzeError(
        f"download of {url} is larger than {limits.format_bytes(cap)} (the size "
        f"cap, {limits.ENV_MAX_DOWNLOAD}, or the cache disk's free space)"
    )


def _receive(url: str, dest: Path, progress: Optional[bool]) -> Optional[str]:
    """The body of ``url`` into ``dest`` (decoded when gzip/deflate-encoded); returns the
    response's Content-Type. Every failure is an :class:`AnalyzeError`."""
    global download_count
    window = limits.read_timeout()
    watchdog = _Watchdog(window, int(limits.MIN_RATE * window))
    request = urllib.request.Request(
        url, headers={"User-Agent": "allennlp-analyze", "Accept-Encoding": "identity"}
    )
    download_count += 1
    try:
        try:
            response = _opener(watchdog).open(request, timeout=limits.connect_timeout())
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            timeout = (socket.timeout, TimeoutError)
            if isinstance(e, urllib.error.URLError) and isinstance(e.reason, timeout):
                why = (
                    f"timed out connecting ({limits.connect_timeout():g} s, "
                    f"{limits.ENV_CONNECT_TIMEOUT})"
                )
            elif watchdog.expired or isinstance(e, timeout):  # no headers in time
                why = f"no response within {window:g} s ({limits.ENV_READ_TIMEOUT})"
            else:
                why = _reason(e)
            raise AnalyzeError(f"cannot download {url}: {why}") from None
        watchdog.advance(watchdog.min_bytes)  # the headers count as progress
        with response:
            return _save_body(url, response, dest, progress, watchdog)
    finally:
        watchdog.stop()


def _save_body(
    url: str, response, dest: Path, progress: Optional[bool], watchdog: _Watchdog
) -> Optional[str]:
    encoding = (response.headers.get("Content-Encoding") or "identity").strip().lower()
    if encoding not in ("identity", "gzip", "x-gzip", "deflate"):
        raise AnalyzeError(f"cannot download {url}: unsupported Content-Encoding {encoding!r}")
    length = response.headers.get("Content-Length")
    total = int(length) if length and length.strip().isdigit() else None
    cap = _size_cap(dest.parent)
    if total is not None and total > cap:
        raise _too_large(url, cap)
    got = 0
    bar = _progress_bar(progress, total, dest.name)
    try:
        with open(dest, "xb") as out:
            while True:
                chunk = response.read1(CHUNK)
                if not chunk:
                    break
                got += len(chunk)
                watchdog.advance(len(chunk))
                if got > cap:
                    raise _too_large(url, cap)
                out.write(chunk)
                if bar is not None:
                    bar.update(len(chunk))
    except (http.client.HTTPException, OSError, ValueError) as e:
        if watchdog.expired or isinstance(e, (socket.timeout, TimeoutError)):
            raise _stalled(url, watchdog, got) from None
        if isinstance(e, http.client.IncompleteRead):
            raise AnalyzeError(
                f"download of {url} is truncated (received {got + len(e.partial)} "
                f"bytes, {e.expected} more expected)"
            ) from None
        raise AnalyzeError(f"download of {url} failed: {_reason(e)}") from None
    finally:
        if bar is not None:
            bar.close()
    if watchdog.expired:  # the watchdog's close looked like the end of the body
        raise _stalled(url, watchdog, got)
    if total is not None and got != total:
        raise AnalyzeError(f"download of {url} is truncated (received {got} of {total} bytes)")
    if encoding != "identity":
        _decode(url, dest, encoding, cap)
    return response.headers.get("Content-Type")


def _stalled(url: str, watchdog: _Watchdog, got: int) -> AnalyzeError:
    return AnalyzeError(
        f"download of {url} stalled: less than "
        f"{limits.format_bytes(limits.MIN_RATE)}/s for {watchdog.window:g} s "
        f"({got} bytes received; {limits.ENV_READ_TIMEOUT} sets the time)"
    )


def _decode(url: str, path: Path, encoding: str, cap: int) -> None:
    """Undo a gzip/deflate Content-Encoding in place, bounded like an archive. A server that
    labels a ``.gz`` file itself as gzip-encoded (a common misconfiguration) meant the file:
    where decoding turns a ``.gz``/``.tgz`` into something that is not gzip, the file is kept."""
    limit = min(cap, limits.expanded_limit(path.stat().st_size))
    decoded = path.with_name(path.name + ".decoded")
    gzip_coding = "gzip" in encoding
    wbits = 16 + zlib.MAX_WBITS if gzip_coding else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    size = 0
    try:
        with open(path, "rb") as src, open(decoded, "xb") as out:
            for block in iter(lambda: src.read(CHUNK), b""):
                while True:  # at most CHUNK bytes out per call: a bomb never sits in memory
                    if inflater.eof:  # gzip allows several members; deflate's tail is ignored
                        if not (gzip_coding and block):
                            break
                        inflater = zlib.decompressobj(wbits)
                    data = inflater.decompress(block, CHUNK)
                    size += len(data)
                    if size > limit:
                        raise AnalyzeError(
                            f"download of {url} decodes ({encoding}) to more than "
                            f"{limits.format_bytes(limit)}; refused"
                        )
                    out.write(data)
                    block = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
                    if not block and (inflater.eof or len(data) < CHUNK):
                        break
        if not inflater.eof:
            raise AnalyzeError(
                f"download of {url} is truncated (its {encoding} encoding ends early)"
            )
    except zlib.error as e:
        raise AnalyzeError(f"download of {url} is not valid {encoding} ({one_line(e)})") from None
    with open(decoded, "rb") as f:
        decoded_is_gzip = f.read(2) == b"\x1f\x8b"
    if path.name.lower().endswith((".gz", ".tgz")) and not decoded_is_gzip:
        decoded.unlink()
    else:
        os.replace(decoded, path)


def download(
    url: str,
    dest: Path,
    progress: Optional[bool] = None,
    validate: Optional[Callable[[Path], object]] = None,
) -> Path:
    """Fetch ``url`` to ``dest``, atomically, and only if ``validate(path)`` (which raises an
    :class:`AnalyzeError` for an unusable file) accepts it. Every failure is an
    :class:`AnalyzeError`, and leaves nothing behind."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".download-"))
    except OSError as e:
        raise AnalyzeError(
            f"cannot create the download cache {dest.parent}: {_reason(e)}"
        ) from None
    done = False
    try:
        tmp = tmpdir / dest.name
        content_type = _receive(url, tmp, progress)
        if validate is not None:
            try:
                validate(tmp)
            except AnalyzeError as e:
                detail = str(e).replace(str(tmp), "it")  # the temporary name means nothing
                if content_type and content_type.split(";")[0].strip().lower() in (
                    "text/html",
                    "application/xhtml+xml",
                ):
                    detail = (
                        f"the server sent a web page (Content-Type {content_type}), not weights"
                    )
                raise AnalyzeError(
                    f"the download of {url} is not usable: {detail}; it was not cached"
                ) from None
        try:
            os.replace(tmp, dest)
        except OSError as e:
            raise AnalyzeError(f"cannot write {dest}: {_reason(e)}") from None
        done = True
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
        if not done:
            try:
                dest.parent.rmdir()  # the URL's cache folder, when nothing else is in it
            except OSError:
                pass
    return dest


def fetch(url: str, cache_dir=None, progress: Optional[bool] = None) -> Path:
    """The local copy of ``url``, downloading it only if it is not cached yet; for a sharded
    checkpoint index, the shards too (into the same cache folder)."""
    path = cache_path(url, cache_dir)
    is_index = registry.names_shards(path)
    if not path.is_file():
        download(url, path, progress, validate=registry.index_shards if is_index else open_path)
    if is_index:
        shards, check = registry.index_shards(path)
        for shard in shards:
            if not safe_relative(shard):  # pragma: no cover - the index readers refuse these
                raise AnalyzeError(f"{url} names a shard outside its folder: {shard!r}")
            shard_path = path.parent / shard
            if not shard_path.is_file():
                download(
                    urllib.parse.urljoin(url, urllib.parse.quote(shard)),
                    shard_path,
                    progress,
                    validate=check or open_path,
                )
    return path


def evict(cached: Path) -> None:
    """Drop a cached download."""
    try:
        cached.unlink()
    except OSError:
        pass


def open_cached(url: str, path: Path, open_fn: Optional[Callable] = None):
    """``open_fn(path)`` (default: :func:`~allennlp_analyze.sources.open_path`) for the cached
    copy of ``url``. When that fails and the file itself does not open, it is removed from the
    cache so that the next run fetches it again (the one rule for both front-ends)."""
    try:
        return open_fn(path) if open_fn is not None else open_path(path, label=url_basename(url))
    except AnalyzeError as e:
        if open_fn is not None and _opens(path):
            raise  # the file is fine: the problem lies elsewhere (an option, the model)
        evict(path)
        detail = str(e).replace(str(path), "it")
        raise AnalyzeError(
            f"the cached download of {url} is not usable: {detail}; it was "
            "removed from the cache (the next run downloads it again)"
        ) from None


def _opens(path: Path) -> bool:
    try:
        open_path(path)
    except AnalyzeError:
        return False
    return True


def open_url(
    url: str, cache_dir=None, progress: Optional[bool] = None, checkpoint_key: Optional[str] = None
):
    def open_fn(path: Path):
        return open_path(path, label=url_basename(url), checkpoint_key=checkpoint_key)

    return open_cached(
        url, fetch(url, cache_dir, progress), open_fn if checkpoint_key is not None else None
    )
