"""The documentation site's generated parts (docs/hooks/), without building the site: the
performance tables come from the saved benchmark output, and the record page documents every
field of the record (so that a new field without documentation fails here, not only in
``make docs``)."""
import importlib.util
import logging
import re
from pathlib import Path

import pytest

from allennlp_analyze.records import RECORD_FIELDS

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _hook(name):
    path = DOCS / "hooks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Page:
    def __init__(self, uri):
        self.file = type("F", (), {"src_uri": uri})()


def test_every_benchmark_table_is_generated():
    bench = _hook("bench")
    page = (DOCS / "performance.md").read_text(encoding="utf-8")
    markers = set(bench.MARKER.findall(page))
    assert markers == set(bench.TABLES)  # every table used, none unknown
    out = bench.on_page_markdown(page, _Page("performance.md"), {}, None)
    assert not bench.MARKER.search(out)
    # Spot checks against the raw output (read here with plain string search, not the parser).
    raw = (DOCS / "bench-last-run.txt").read_text(encoding="utf-8")
    analyze_s = re.findall(r"^all-MiniLM-L6-v2: .*?; analyze ([\d.]+) s", raw, flags=re.M)
    assert analyze_s and f"| all-MiniLM-L6-v2 | 12 (12 gram) | {float(analyze_s[0]):g} s |" in out
    ratios = [int(r) for r in re.findall(r"ms\s+(\d+)x\s+yes$", raw, flags=re.M)]
    assert f"fit ≥ 50× at every n | min {min(ratios)}× |" in out


def test_an_unreadable_benchmark_output_is_a_warning(tmp_path, monkeypatch, caplog):
    bench = _hook("bench")
    broken = tmp_path / "run.txt"
    broken.write_text("== power-law fit vs powerlaw 1.5 ==\nnothing here\n", encoding="utf-8")
    monkeypatch.setattr(bench, "RUN_FILE", str(broken))
    with caplog.at_level(logging.WARNING):
        out = bench.on_page_markdown("<!-- bench: fit -->", _Page("p.md"), {}, None)
    assert out == "<!-- bench: fit -->"
    assert "benchmark table 'fit'" in caplog.text


def test_the_record_page_documents_every_field(caplog):
    generated = _hook("generated")
    page = (DOCS / "records.md").read_text(encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        out = generated.on_page_markdown(page, _Page("records.md"), {}, None)
    assert caplog.text == ""
    assert " ".join(f"`{f}`" for f in RECORD_FIELDS) in out
    with caplog.at_level(logging.WARNING):
        generated.on_page_markdown(page.replace("| `status` |", "| `stat` |"),
                                   _Page("records.md"), {}, None)
    assert "without a row in the table: status" in caplog.text
    assert "the record lacks: stat" in caplog.text


@pytest.mark.parametrize("option", ["--plot-match", "--min-q", "--scheduler"])
def test_the_options_page_is_the_parser_help(option):
    generated = _hook("generated")
    out = generated.on_page_markdown("<!-- cli-help -->", _Page("cli.md"), {}, None)
    assert out.startswith("```text\nusage: allennlp-analyze") and option in out
