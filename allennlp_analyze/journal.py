"""JSON lines: the ``--format jsonl`` report, and the sweep file that makes a run resumable
(``--output-file sweep.jsonl``, ``--resume``).

One JSON object per line::

    {"allennlp_analyze_sweep": 1, "options": {...}}                 header: the analysis options
                                                                     (but --workers: speed only;
                                                                     with --checkpoint-key, and
                                                                     --base / --delta, too)
    {"model": "a", "name": "fc1.weight", ...}                       one line per record, as in
    ...                                                              --format json's "records"
    {"source_complete": {"source": "runs/a", "label": "a", "model": "a", "records": 12,
                         "skipped": {...}, "note": null}}             the end of source "runs/a"

A source's *block* is its record lines followed by its end line. A sweep file gets each block
as soon as its source is complete, in one write, flushed and fsynced before the run goes on, so
that a killed run leaves complete blocks and at most one incomplete one at the end (record lines
without their end line, or a torn last line). :class:`Journal` reads such a file back for
``--resume``: complete blocks are taken, an incomplete tail is cut off (its source is analyzed
again, never half-kept), anything else that is not a sweep file is an error. While a run goes
on, blocks are in the order their sources finished and records carry their source's own
label; when the run ends the file is rewritten once (atomically) in the order of the run's
sources, with the labels of a local run (made unique with " #2"...): the file an uninterrupted
run would have written. Blocks of sources that the run did not name are kept, after those.

Reading the records back: every line that has neither the key ``allennlp_analyze_sweep`` nor
``source_complete``.
"""

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import IO, Dict, List, Optional, Sequence, Tuple, Union

from .errors import AnalyzeError
from .options import AnalysisOptions
from .records import RECORD_FIELDS, MatrixRecord, SourceInfo

HEADER_KEY = "allennlp_analyze_sweep"
END_KEY = "source_complete"
VERSION = 1
#: Options that change how fast a run is, not its records: left out of the header, so that a
#: resumed run may differ in them.
_SPEED_OPTIONS = ("workers",)

#: A complete source: its end line and its records.
Block = Tuple[SourceInfo, List[MatrixRecord]]


#: What else makes a run's records, beside its options: ``{"base": the --base source as named,
#: "delta": --delta}`` for a comparison with a base model, None otherwise.
Compared = Optional[Dict[str, object]]


def header_line(
    options: AnalysisOptions, checkpoint_key: Optional[str] = None, compared: Compared = None
) -> str:
    """The first line: the format's version and the options that make the records."""
    return _line({HEADER_KEY: VERSION, "options": _options_dict(options, checkpoint_key, compared)})


def block_text(info: SourceInfo, records: Sequence[MatrixRecord]) -> str:
    """One source's block: its record lines and its end line."""
    return "".join([_line(r.to_dict()) for r in records] + [_line({END_KEY: asdict(info)})])


def write_jsonl(
    options: AnalysisOptions,
    sources: Sequence[SourceInfo],
    records: Sequence[MatrixRecord],
    out: IO[str],
    checkpoint_key: Optional[str] = None,
    compared: Compared = None,
) -> None:
    """The header, then the block of each source (its ``info.records`` records, taken from
    ``records`` in order)."""
    out.write(header_line(options, checkpoint_key, compared))
    start = 0
    for info in sources:
        out.write(block_text(info, records[start : start + info.records]))
        start += info.records
    if start != len(records):
        raise ValueError(f"{len(records)} records, but the sources account for {start}")


class Journal:
    """The sweep file of one run: opened afresh (truncated, header written) or, with
    ``resume``, read back for its complete sources (:meth:`take`); :meth:`append` adds a
    complete source, :meth:`finish` rewrites the file in the run's order. A context manager."""

    def __init__(
        self,
        path: Union[str, os.PathLike],
        options: AnalysisOptions,
        resume: bool,
        checkpoint_key: Optional[str] = None,
        compared: Compared = None,
    ):
        self.path = Path(path)
        self.checkpoint_key, self.compared = checkpoint_key, compared
        self._blocks: List[Tuple[Block, str]] = []
        self._taken: List[bool] = []
        valid_end = 0
        if resume and self.path.exists():
            valid_end, self._blocks = _read(
                self.path, _options_dict(options, checkpoint_key, compared)
            )
            self._taken = [False] * len(self._blocks)
        try:
            if valid_end:
                self._file = open(self.path, "r+", encoding="utf-8", newline="")
                self._file.truncate(valid_end)  # an incomplete last block is cut off
                self._file.seek(valid_end)
            else:
                self._file = open(self.path, "w", encoding="utf-8", newline="")
                self._write(header_line(options, checkpoint_key, compared))
                _fsync_dir(self.path.parent)
        except OSError as e:
            raise AnalyzeError(f"cannot write {self.path}: {e.strerror or e}") from None

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def take(self, source: str) -> Optional[Block]:
        """A complete block of ``source`` (named as in the file) not taken yet, or None."""
        for k, ((info, records), _) in enumerate(self._blocks):
            if not self._taken[k] and info.source == source:
                self._taken[k] = True
                return info, records
        return None

    def append(self, info: SourceInfo, records: Sequence[MatrixRecord]) -> None:
        """Add one complete source's block: one write, flushed and fsynced."""
        try:
            self._write(block_text(info, records))
        except OSError as e:
            raise AnalyzeError(f"cannot write {self.path}: {e.strerror or e}") from None

    def finish(
        self,
        options: AnalysisOptions,
        sources: Sequence[SourceInfo],
        records: Sequence[MatrixRecord],
    ) -> None:
        """Rewrite the file as :func:`write_jsonl` of the run, followed by the blocks read at
        the start that the run did not take; atomically (a new file renamed over the old)."""
        self.close()
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                write_jsonl(options, sources, records, f, self.checkpoint_key, self.compared)
                for (_, text), taken in zip(self._blocks, self._taken):
                    if not taken:
                        f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise AnalyzeError(f"cannot write {self.path}: {e.strerror or e}") from None
        _fsync_dir(self.path.parent)

    def _write(self, text: str) -> None:
        self._file.write(text)
        self._file.flush()
        os.fsync(self._file.fileno())


def _read(path: Path, options: Dict[str, object]) -> Tuple[int, List[Tuple[Block, str]]]:
    """The complete blocks of the sweep file ``path`` written with ``options`` (as in its
    header), with their text, and the byte offset where the last one ends (0: no header yet,
    start afresh)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise AnalyzeError(f"cannot read {path}: {e.strerror or e}") from None
    lines = data.split(b"\n")[:-1]  # the piece after the last newline is torn (or empty)
    parsed = [_parse(line) for line in lines]
    if not parsed:
        return 0, []  # empty, or killed before the header was complete: start afresh
    if not (isinstance(parsed[0], dict) and HEADER_KEY in parsed[0]):
        raise AnalyzeError(
            f"{path} is not a sweep file of allennlp-analyze "
            "(--format jsonl); leave out --resume to overwrite it"
        )
    _check_header(path, parsed[0], options)
    ends = [i for i, obj in enumerate(parsed) if isinstance(obj, dict) and END_KEY in obj]
    last = ends[-1] if ends else 0
    blocks: List[Tuple[Block, str]] = []
    pending: List[MatrixRecord] = []
    first = 1
    for i in range(1, last + 1):
        obj = parsed[i]
        if isinstance(obj, dict) and END_KEY in obj:
            info = _source_info(path, i, obj[END_KEY])
            if info.records != len(pending):
                raise _damaged(
                    path,
                    i,
                    f"the end line of {info.source} counts {info.records} "
                    f"records, {len(pending)} precede it",
                )
            text = b"\n".join(lines[first : i + 1]).decode("utf-8") + "\n"
            blocks.append(((info, pending), text))
            pending, first = [], i + 1
        elif isinstance(obj, dict) and set(obj) == set(RECORD_FIELDS):
            try:
                pending.append(MatrixRecord.from_dict(obj))
            except (TypeError, ValueError):
                raise _damaged(path, i, "a malformed record") from None
        else:
            raise _damaged(path, i, "not a record or end line of this version of allennlp-analyze")
    return sum(len(line) + 1 for line in lines[: last + 1]), blocks


def _parse(line: bytes) -> Optional[object]:
    try:
        return json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None


def _check_header(path: Path, header: Dict, ours: Dict[str, object]) -> None:
    if header.get(HEADER_KEY) != VERSION:
        raise AnalyzeError(
            f"{path} is a sweep file of another version "
            f"({header.get(HEADER_KEY)!r}, this is {VERSION}); it cannot be resumed"
        )
    theirs = header.get("options") or {}
    differ = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
    if differ:
        what = ", ".join(f"{k} {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in differ[:3])
        raise AnalyzeError(
            f"{path} was written with other options ({what}); resume with the "
            "same options, or leave out --resume to start afresh"
        )


def _source_info(path: Path, i: int, d: object) -> SourceInfo:
    if not isinstance(d, dict):
        raise _damaged(path, i, "a malformed end line")
    try:
        info = SourceInfo(**d)
    except TypeError:
        raise _damaged(path, i, "a malformed end line") from None
    if not isinstance(info.records, int) or not isinstance(info.skipped, dict):
        raise _damaged(path, i, "a malformed end line")
    return info


def _damaged(path: Path, i: int, why: str) -> AnalyzeError:
    return AnalyzeError(f"{path} is damaged at line {i + 1} ({why}); it cannot be resumed")


def _options_dict(
    options: AnalysisOptions, checkpoint_key: Optional[str] = None, compared: Compared = None
) -> Dict[str, object]:
    """The options that make the records, as JSON values (tuples as lists), the
    ``checkpoint_key`` where one is given, and ``compared``'s keys where given."""
    d = {
        k: v
        for k, v in json.loads(json.dumps(vars(options), default=list)).items()
        if k not in _SPEED_OPTIONS
    }
    if checkpoint_key is not None:
        d["checkpoint_key"] = checkpoint_key
    d.update(compared or {})
    return d


def _line(obj: object) -> str:
    return json.dumps(obj, allow_nan=False) + "\n"


def _fsync_dir(folder: Path) -> None:
    """Make a file's creation or renaming in ``folder`` durable (where the OS allows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
