"""Runs on an executor and resumable sweeps, without Dask: the split rule by hand, a process pool
against the local run (bit for bit), the JSON-lines format, and ``--resume`` after a real
``allennlp-analyze`` process was killed (SIGKILL) midway, after a torn write, and its refusals.
The Dask cluster itself: ``test_dask.py``."""
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from allennlp_analyze import analyze, cli
from allennlp_analyze.journal import END_KEY, HEADER_KEY
from allennlp_analyze.records import RECORD_FIELDS, MatrixRecord
from allennlp_analyze.selection import MatrixPlan
from allennlp_analyze.sources import open_source
from allennlp_analyze.tasks import PART_COST, split

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zoo(sweep_zoo):
    return sweep_zoo


def _plan(param, N, M, part=None):
    return MatrixPlan(name=param + (f"[{part}]" if part else ""), param=param, module_type=None,
                      dtype="float32", shape=(N, M), part=part)


def test_split_rule_by_hand():
    big = [_plan(f"l{i}.weight", 2048, 1024) for i in range(3)]        # 2048 * 1024**2 = 2.1e9
    fused = [_plan("attn.in_proj_weight", 1024, 1024, p) for p in "qkv"]  # 3 x 1.07e9
    small = [_plan(f"s{i}.weight", 100, 10) for i in range(3)]          # 1e4 each
    names = lambda plans: [p.name for p in plans]  # noqa: E731
    assert 2048 * 1024 ** 2 >= PART_COST > 1024 ** 3
    # Read whole when opened, or less work than 2 * PART_COST: the whole source, one part.
    assert split(big, reads_one_by_one=False) == [names(big)]
    assert split(big[:1] + small, reads_one_by_one=True) == [names(big[:1] + small)]
    assert split([], reads_one_by_one=True) == [[]]
    # Split: a part closes once it reaches PART_COST; q/k/v of one parameter stay together
    # (3.2e9 in one part); the small tail is its own last part.
    plans = big + fused + small
    assert split(plans, reads_one_by_one=True) == [
        names(big[:1]), names(big[1:2]), names(big[2:]), names(fused), names(small)]
    # Small parameters accumulate until a part reaches PART_COST.
    mids = [_plan(f"m{i}.weight", 1000, 500) for i in range(20)]  # 2.5e8 each: 8 per part
    parts = split(mids, reads_one_by_one=True)
    assert [len(p) for p in parts] == [8, 8, 4]
    assert sum(parts, []) == names(mids)


def test_zoo_is_split_where_expected(zoo):
    from allennlp_analyze.selection import plan
    from allennlp_analyze.tasks import reads_one_by_one
    from allennlp_analyze.options import AnalysisOptions

    sources, _ = zoo
    counts = []
    for spec in sources[:-1]:
        source = open_source(spec)
        counts.append(len(split(plan(source.tensors(), AnalysisOptions()).plans,
                                reads_one_by_one(source))))
    assert counts[-1] == 4 and set(counts[:-1]) == {1}  # the sharded one: 3 big, 1 small part


def test_process_pool_equals_local_bit_for_bit(zoo):
    sources, local = zoo
    assert local.summary.errors == [f"{sources[-1]} does not exist"]
    assert {r.method for r in local.records} >= {"gram", "gram>svd"}
    assert {r.status for r in local.records} >= {"ok", "nonfinite"}
    assert {"not a weight: a mask (all values 0 or 1)", "not a weight: all values equal (and "
            "not 0)"} <= set(local.summary.skipped)  # counted when read, in the split source
    with ProcessPoolExecutor(2) as pool:
        remote = analyze(*sources, on_error="collect", executor=pool)
    assert len(remote.records) == len(local.records) >= 40
    for a, b in zip(remote.records, local.records):
        assert a == b, (a.model, a.name)  # every float with ==, not approx
    assert remote.summary == local.summary and remote.sources == local.sources
    assert [s.model for s in local.sources][-5:] == [
        "model.safetensors #2", "model.safetensors #3", "model.safetensors #4",
        "model.safetensors #5", "model.safetensors.index.json"]


def test_weights_never_travel(zoo, tmp_path):
    """An executor's tasks take paths and URLs, a journal needs them to name its sources."""
    state = {"fc.weight": np.ones((6, 3))}
    with ProcessPoolExecutor(1) as pool, pytest.raises(TypeError, match="paths or URLs"):
        analyze(state, executor=pool)
    with pytest.raises(ValueError, match="a journal needs every source named"):
        analyze(state, journal=tmp_path / "s.jsonl")
    assert not (tmp_path / "s.jsonl").exists()


def test_jsonl_report(zoo, tmp_path, capsys):
    sources, local = zoo
    quick = sources[3:-1]
    out = tmp_path / "r.jsonl"
    assert cli.main([*quick, "-o", str(out)]) == 0
    assert capsys.readouterr() == ("", "")
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    options = json.loads(json.dumps(vars(local.options), default=list))
    del options["workers"]  # speed only: a resumed run may change it
    assert lines[0] == {HEADER_KEY: 1, "options": options}
    ends = [d[END_KEY] for d in lines if END_KEY in d]
    assert [e["source"] for e in ends] == quick
    assert [e["model"] for e in ends] == local.summary.models[3:]
    assert [e["skipped"] for e in ends] == [s.skipped for s in local.sources[3:]]
    records = [d for d in lines[1:] if END_KEY not in d]
    assert all(list(d) == list(RECORD_FIELDS) for d in records)
    expected = [r for r in local.records if r.model in local.summary.models[3:]]
    assert records == [r.to_dict() for r in expected]
    assert [MatrixRecord.from_dict(d) for d in records] == expected
    # Each block is its records and then its end line, which counts them.
    at = 1
    for end in ends:
        assert all(d["model"] == end["model"] for d in lines[at:at + end["records"]])
        at += end["records"]
        assert lines[at] == {END_KEY: end}
        at += 1
    assert at == len(lines)


def test_resume_after_sigkill_gives_the_uninterrupted_file(zoo, tmp_path):
    sources = zoo[0][3:-1]  # MiniLM, 4 small ones, the big one last
    whole = tmp_path / "whole.jsonl"
    assert _cli(*sources, "-o", whole).returncode == 0
    sweep = tmp_path / "sweep.jsonl"
    proc = subprocess.Popen(_argv(*sources, "-o", sweep), env=_env(), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _ends(sweep) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = _ends(sweep)
    assert 2 <= done < len(sources)
    resumed = _cli(*sources, "-o", sweep, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert sweep.read_bytes() == whole.read_bytes()


def test_torn_tail_is_redone_never_half_kept(zoo, tmp_path):
    sources = zoo[0][3:8]  # MiniLM and the 4 small ones
    whole = tmp_path / "whole.jsonl"
    expected = analyze(*sources, journal=whole)
    data = whole.read_bytes()
    lines = data.split(b"\n")
    ends = [i for i, line in enumerate(lines) if END_KEY.encode() in line]
    upto = lambda i: len(b"\n".join(lines[:i])) + 1  # noqa: E731  (bytes of lines[:i])
    cuts = [upto(ends[1] + 1) + 30,  # inside the 3rd block's first record line
            upto(ends[2]),           # all of its records, not its end line
            upto(ends[2]) + 10]      # inside its end line
    for cut in cuts:
        sweep = tmp_path / "sweep.jsonl"
        sweep.write_bytes(data[:cut])
        opener = Counting()
        result = analyze(*sources, journal=sweep, resume=True, opener=opener)
        assert opener.opened == sources[2:]  # the cut source is analyzed again, the first two not
        assert sweep.read_bytes() == data
        assert result.records == expected.records and result.summary == expected.summary


def test_resume_with_sources_added_and_dropped(zoo, tmp_path):
    small = zoo[0][4:8]
    sweep, fresh = tmp_path / "sweep.jsonl", tmp_path / "fresh.jsonl"
    analyze(*small[:3], journal=sweep)
    dropped = sweep.read_text().splitlines(keepends=True)[1:5]  # small[0]'s 3 records, end line
    assert END_KEY in dropped[-1] and small[0] in dropped[-1]
    opener = Counting()
    analyze(*small[1:], journal=sweep, resume=True, opener=opener)
    assert opener.opened == [small[3]]
    analyze(*small[1:], journal=fresh)
    assert sweep.read_text() == fresh.read_text() + "".join(dropped)


class Counting:
    """An opener that notes which sources it opened."""

    def __init__(self):
        self.opened = []

    def __call__(self, spec, **kwargs):
        self.opened.append(spec)
        return open_source(spec, **kwargs)


def test_resume_errors_are_one_line(zoo, tmp_path, capsys):
    sources = zoo[0][4:6]
    sweep = tmp_path / "sweep.jsonl"
    assert cli.main([*sources, "-o", str(sweep)]) == 0
    good = sweep.read_text()
    other = tmp_path / "other.jsonl"
    other.write_text('{"a": 1}\n')
    damaged = tmp_path / "damaged.jsonl"
    damaged.write_text(good.replace('"records": ', '"records": 1', 1))
    cases = [
        ((*sources, "-o", sweep, "--resume", "--min-q", "1"),
         "was written with other options (min_q 1.1 there, 1.0 here)"),
        ((*sources, "-o", other, "--resume"), "is not a sweep file of allennlp-analyze"),
        ((*sources, "-o", damaged, "--resume"), "is damaged at line"),
        ((*sources, "--resume"), "--resume needs a JSON-lines --output-file"),
        ((*sources, "-o", tmp_path / "x.json", "--resume"), "--resume needs a JSON-lines"),
        ((*sources, "-o", sweep, "--resume", "--plot-dir", tmp_path / "p"),
         "--plot-dir cannot be combined with --resume"),
        ((*sources, "-o", tmp_path / "no" / "dir.jsonl"), "cannot write"),
    ]
    for argv, fragment in cases:
        assert cli.main(list(map(str, argv))) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and err.startswith("allennlp-analyze: error: ")
        assert fragment in err, (fragment, err)
    assert sweep.read_text() == good  # a refused resume leaves the file alone
    # The same options, speed aside (--workers): resumed, nothing to do, the same file.
    assert cli.main([*sources, "-o", str(sweep), "--resume", "--workers", "1"]) == 0
    assert sweep.read_text() == good


def test_without_dask_scheduler_is_one_clear_error(zoo, tmp_path):
    """Dask made unimportable in a fresh process: the core analyzes; --scheduler is one line."""
    block = ("import sys; sys.modules['distributed'] = sys.modules['dask'] = None; "
             "from allennlp_analyze.cli import main; sys.exit(main(sys.argv[1:]))")
    source = zoo[0][4]  # a small safetensors checkpoint
    ok = subprocess.run([sys.executable, "-c", block, source, "-o", tmp_path / "a.jsonl"],
                        capture_output=True, text=True, env=_env())
    assert ok.returncode == 0, ok.stderr
    proc = subprocess.run([sys.executable, "-c", block, source, "--scheduler",
                           "tcp://127.0.0.1:8786"], capture_output=True, text=True, env=_env())
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("allennlp-analyze: error: --scheduler needs Dask distributed, which "
                           "is not installed: pip install 'allennlp-analyze[dask]'\n")


def _ends(path: Path) -> int:
    try:
        return path.read_bytes().count(f'{{"{END_KEY}"'.encode())
    except FileNotFoundError:
        return 0


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO))


def _argv(*args):
    return [sys.executable, "-m", "allennlp_analyze", *map(str, args), "--no-progress"]


def _cli(*args):
    return subprocess.run(_argv(*args), capture_output=True, text=True, env=_env(), timeout=300)
