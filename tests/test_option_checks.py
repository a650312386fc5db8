"""Every option is checked before any source is opened: a bad one is one stderr line, exit 2 and
nothing on stdout, for the standalone command (in subprocesses) and the AllenNLP subcommand.

The sources named are missing files (or a --sources-from list that does not exist): were they
opened first, their error would be the one reported instead of the option's."""
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO / "fixtures" / "archives" / "tagger_lstm.tar.gz"


#: The cases also run with a missing --sources-from list (one of each class).
LIST_CASES = ("plot_match", "min_q", "output_folder_missing", "describe_plots")


def _cases(tmp: Path):
    """(name, argv after the sources, fragment of the error line)."""
    blocker = tmp / "a_file"  # a file, written by the fixture
    figs = ["--plot-dir", str(tmp / "figs")]
    return [
        # regexes
        ("plot_match", ["--plot-match", "[", *figs], "invalid --plot-match pattern '['"),
        ("match", ["--match", "("], "invalid name pattern '('"),
        ("exclude", ["--exclude", "a{2,1}"], "invalid name pattern 'a{2,1}'"),
        # numbers
        ("min_q", ["--min-q", "0.5"], "--min-q must be >= 1"),
        ("min_q_nan", ["--min-q", "nan"], "--min-q must be a finite number"),
        ("plot_max", ["--plot-max", "-2", *figs], "--plot-max must be -1 (all) or >= 0"),
        ("workers", ["--workers", "100000"], "--workers must be between 0"),
        ("loose_tol", ["--loose-tol", "-1"], "--loose-tol must be >= 0"),
        # paths of outputs
        ("output_folder_missing", ["-o", str(tmp / "no" / "such" / "r.json")],
         "its folder " + str(tmp / "no" / "such") + " does not exist"),
        ("output_is_folder", ["-o", str(tmp)], f"cannot write {tmp}: it is a folder"),
        ("plot_dir_under_file", ["--plot-dir", str(blocker / "figs")],
         f"cannot create --plot-dir {blocker / 'figs'}: {blocker} is not a folder"),
        ("plot_dir_is_file", ["--plot-dir", str(blocker)], "a file of that name exists"),
        ("cache_dir_is_file", ["--cache-dir", str(blocker)], "cannot create --cache-dir"),
        # combinations
        ("plot_match_alone", ["--plot-match", "x"], "--plot-match selects figures"),
        ("describe_plots", ["--describe", *figs], "--describe computes no spectra: --plot-dir"),
        ("describe_fail", ["--describe", "--fail-on-collapse"], "--fail-on-collapse"),
        ("describe_jsonl", ["--describe", "--format", "jsonl"], "not jsonl"),
        ("resume_no_file", ["--resume"], "--resume needs a JSON-lines --output-file"),
        ("resume_plots", ["--resume", "-o", str(tmp / "s.jsonl"), *figs],
         "--plot-dir cannot be combined with --resume"),
    ]


def _run(argv):
    proc = subprocess.run([sys.executable, "-m", "allennlp_analyze", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case, twice: with a missing source file and with a missing --sources-from list;
    and the issue's case, with a real archive (whose report must not appear)."""
    tmp = tmp_path_factory.mktemp("options")
    (tmp / "a_file").write_text("not a folder")
    cases = _cases(tmp)
    argvs = {}
    for name, argv, _ in cases:
        argvs[(name, "source")] = [str(tmp / "nothere.safetensors"), *argv]
        if name in LIST_CASES:
            argvs[(name, "list")] = ["--sources-from", str(tmp / "nothere.txt"), *argv]
    argvs[("real_archive", "source")] = [str(ARCHIVE), "--plot-match", "[", "--plot-dir",
                                        str(tmp / "figs")]
    with ThreadPoolExecutor(4) as pool:
        results = dict(zip(argvs, pool.map(_run, argvs.values())))
    return tmp, {name: fragment for name, _, fragment in cases}, results


def _assert_one_line(result, fragment, prog="allennlp-analyze"):
    rc, out, err = result
    assert (rc, out) == (2, ""), result
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
    assert fragment in err, (fragment, err)


@pytest.mark.parametrize("name", [c[0] for c in _cases(Path("/nonexistent"))])
def test_bad_option_is_reported_before_any_source(runs, name):
    tmp, fragments, results = runs
    _assert_one_line(results[(name, "source")], fragments[name])
    if name in LIST_CASES:
        _assert_one_line(results[(name, "list")], fragments[name])
    assert not (tmp / "figs").exists()  # nothing created either


def test_invalid_plot_regex_stops_before_the_analysis(runs):
    """The issue's case: the report used to print in full before the error."""
    tmp, _, results = runs
    _assert_one_line(results[("real_archive", "source")], "invalid --plot-match pattern '['")


def test_good_options_reach_the_sources(tmp_path):
    """The checks refuse nothing valid: the missing source is then the error."""
    missing = tmp_path / "nothere.safetensors"
    _assert_one_line(_run([str(missing), "--plot-match", "x", "--plot-dir", str(tmp_path / "f"),
                           "-o", str(tmp_path / "r.json"), "--cache-dir", str(tmp_path / "c")]),
                     f"{missing} does not exist")


def test_subcommand_checks_its_own_and_the_shared_options(tmp_path, capsys):
    pytest.importorskip("allennlp")
    import argparse

    from allennlp_analyze.plugin.subcommand import Analyze

    missing = str(tmp_path / "nothere.tar.gz")
    for argv, fragment in (
        (["--plot-match", "[", "--plot-dir", str(tmp_path / "f")], "invalid --plot-match"),
        (["-o", str(tmp_path / "no" / "r.json")], "does not exist"),
        (["--cuda-device", "-3"], "--cuda-device must be -1"),
        (["--overrides", "{not json"], "--overrides is not valid JSON"),
        (["--overrides", "[1]"], "--overrides must be a JSON object"),
        (["--weights-file", str(tmp_path / "no.th")], "--weights-file"),
        # checked before --include-package modules are imported
        (["--min-q", "0", "--include-package", "no_such_package_xyz"], "--min-q"),
    ):
        parser = argparse.ArgumentParser(prog="allennlp")
        Analyze().add_subparser(parser.add_subparsers())
        args = parser.parse_args(["analyze", missing, *argv])
        with pytest.raises(SystemExit) as exc:
            args.func(args)
        out, err = capsys.readouterr()
        _assert_one_line((exc.value.code, out, err), fragment, prog="allennlp analyze")
