"""Runs many command lines of one front-end in one process (the AllenNLP one takes seconds to
start), each as the command would run it, and records what each did.

    python hostile_runner.py standalone|plugin CASES.json RESULTS.json

CASES.json: a list of ``{"argv": [...], "env": {...}, "stdout": PATH or null}``. Each case runs
``allennlp-analyze ARGV`` (``cli.main``) or ``allennlp analyze ARGV`` (the subcommand), with
``env`` set for it, stdout and stderr captured (or stdout written to PATH), under a SIGALRM
deadline: a case that hangs is ended and recorded as such, and the next one runs. RESULTS.json:
per case ``{"rc", "out", "err", "seconds", "left"}``, ``left`` being the files left in the
temporary folder ($TMPDIR) afterwards. The caller bounds the process's memory and time.
"""
import argparse
import contextlib
import io
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

CASE_SECONDS = 60


class Hung(BaseException):
    pass


def _alarm(signum, frame):
    raise Hung()


def _command(front: str):
    if front == "standalone":
        from allennlp_analyze import cli

        return cli.main
    from allennlp_analyze.plugin.subcommand import Analyze

    def run(argv):
        parser = argparse.ArgumentParser(prog="allennlp")
        Analyze().add_subparser(parser.add_subparsers())
        args = parser.parse_args(["analyze", *argv])
        try:
            args.func(args)
        except SystemExit as e:
            return e.code
        return None

    return run


def _run_case(command, case: dict) -> dict:
    saved = {k: os.environ.get(k) for k in case.get("env", {})}
    os.environ.update(case.get("env", {}))
    out, err = io.StringIO(), io.StringIO()
    target = open(case["stdout"], "w", encoding="utf-8") if case.get("stdout") else out
    start = time.monotonic()
    signal.alarm(case.get("seconds", CASE_SECONDS))
    try:
        with contextlib.redirect_stdout(target), contextlib.redirect_stderr(err):
            try:
                rc = command(case["argv"])
            except SystemExit as e:  # argparse
                rc = e.code
    except Hung:
        rc = "hung"
    except BaseException as e:  # a traceback would have been printed
        rc = f"raised {type(e).__name__}: {e}"
    finally:
        signal.alarm(0)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if target is not out:
            try:
                target.close()
            except OSError:
                pass
    tmp = Path(tempfile.gettempdir())
    return {"rc": rc, "out": out.getvalue()[-20000:], "err": err.getvalue()[-5000:],
            "seconds": round(time.monotonic() - start, 2),
            "left": sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*"))}


def main() -> None:
    front, cases_path, results_path = sys.argv[1:4]
    signal.signal(signal.SIGALRM, _alarm)
    command = _command(front)
    cases = json.loads(Path(cases_path).read_text())
    results = [_run_case(command, case) for case in cases]
    Path(results_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
