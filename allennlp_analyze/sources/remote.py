"""Weights behind an http(s) URL: downloaded once into a cache, then opened as a local file.

Cache: ``cache_dir`` argument, else ``$ALLENNLP_ANALYZE_CACHE``, else
``~/.cache/allennlp_analyze``; each URL gets ``<cache>/<sha256(url)[:16]>/<basename>``. A file
is written to a temporary name and renamed into place only once complete (Content-Length
checked), so an interrupted download is never mistaken for a cached one. A URL to a sharded
checkpoint's ``*.index.json`` also fetches the shards it names, from beside it.
"""
import hashlib
import http.client
import os
import posixpath
import socket
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional

from ..errors import AnalyzeError
from ._common import one_line, read_index, safe_relative, shard_order

ENV_CACHE = "ALLENNLP_ANALYZE_CACHE"
TIMEOUT_S = 60
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
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    return cache_root(cache_dir) / digest / url_basename(url)


def _reason(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
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
            return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                        file=sys.stderr, leave=False)
    return None


def download(url: str, dest: Path, progress: Optional[bool] = None) -> Path:
    """Fetch ``url`` to ``dest`` (atomically). Every failure is an :class:`AnalyzeError`."""
    global download_count
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AnalyzeError(f"cannot create the download cache {dest.parent}: {_reason(e)}") from None
    request = urllib.request.Request(url, headers={"User-Agent": "allennlp-analyze"})
    download_count += 1
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        raise AnalyzeError(f"cannot download {url}: {_reason(e)}") from None
    tmp = None
    try:
        with response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.strip().isdigit() else None
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
            got = 0
            bar = _progress_bar(progress, total, dest.name)
            try:
                with os.fdopen(fd, "wb") as out:
                    while True:
                        chunk = response.read(CHUNK)
                        if not chunk:
                            break
                        out.write(chunk)
                        got += len(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
        if total is not None and got != total:
            raise AnalyzeError(f"download of {url} is truncated (received {got} of {total} bytes)")
        os.replace(tmp, dest)
        tmp = None
    except http.client.IncompleteRead as e:
        raise AnalyzeError(f"download of {url} is truncated (received {len(e.partial)} bytes, "
                           f"{e.expected} more expected)") from None
    except (http.client.HTTPException, OSError) as e:
        raise AnalyzeError(f"download of {url} failed: {_reason(e)}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return dest


def fetch(url: str, cache_dir=None, progress: Optional[bool] = None) -> Path:
    """The local copy of ``url``, downloading it only if it is not cached yet; for a sharded
    checkpoint index, the shards too (into the same cache folder)."""
    path = cache_path(url, cache_dir)
    if not path.is_file():
        download(url, path, progress)
    if path.name.endswith(".index.json"):
        weight_map = read_index(path)
        for shard in shard_order(weight_map):
            if not safe_relative(shard):  # pragma: no cover - read_index already refuses these
                raise AnalyzeError(f"{url} names a shard outside its folder: {shard!r}")
            shard_path = path.parent / shard
            if not shard_path.is_file():
                download(urllib.parse.urljoin(url, urllib.parse.quote(shard)), shard_path, progress)
    return path


def open_url(url: str, cache_dir=None, progress: Optional[bool] = None,
             checkpoint_key: Optional[str] = None):
    from . import open_path

    return open_path(fetch(url, cache_dir, progress), label=url_basename(url),
                     checkpoint_key=checkpoint_key)
