"""Dask distributed as the engine of a run (``analyze(..., scheduler=ADDRESS)``, ``--scheduler``):
the only module that imports Dask (``pip install 'allennlp-analyze[dask]'``).

A cluster: ``dask scheduler`` on one machine, ``dask worker tcp://HOST:8786 --nthreads 1
--nworkers N`` on each (one worker thread per core), every worker with this package installed
and the weights' paths (or the URLs) in reach. How a run is cut into tasks:
:mod:`allennlp_analyze.tasks`.
"""

import contextlib
import socket
from concurrent.futures import Executor
from typing import Iterator

from ..errors import AnalyzeError, one_line

#: Seconds to reach the scheduler before giving up.
CONNECT_TIMEOUT = 10


@contextlib.contextmanager
def scheduler_executor(address: str) -> Iterator[Executor]:
    """An executor whose tasks run on the Dask cluster of the scheduler at ``address``
    (``tcp://host:8786``; a bare ``host:port`` is TCP), closed again on exit. A missing Dask
    or an unreachable scheduler is one :class:`AnalyzeError`."""
    try:
        from distributed import Client
        from distributed.comm import parse_address, parse_host_port
    except ImportError:
        raise AnalyzeError(
            "--scheduler needs Dask distributed, which is not installed: "
            "pip install 'allennlp-analyze[dask]'"
        ) from None
    try:
        scheme, location = parse_address(address)
        if scheme in ("tcp", "tls"):  # fail fast, and before Dask retries until its timeout
            socket.create_connection(parse_host_port(location), CONNECT_TIMEOUT).close()
        client = Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
    except (OSError, ValueError, TypeError) as e:
        raise AnalyzeError(
            f"cannot reach the Dask scheduler at {address}: "
            f"{e.strerror if isinstance(e, OSError) and e.strerror else one_line(e)}"
        ) from None
    try:
        yield client.get_executor(pure=False)
    finally:
        client.close()
