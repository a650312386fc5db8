"""MkDocs hook: sections generated from the package itself when the site is built.

* ``<!-- record-fields -->`` (records.md): the record's columns, in order, from
  ``allennlp_analyze.records.RECORD_FIELDS``; the build fails (a warning under ``--strict``)
  when a field has no row in that page's table, or a row names a field that does not exist.
* ``<!-- cli-help -->`` (cli.md): ``allennlp-analyze --help``, from the command's own parser.
"""

import logging
import os
import re
import sys

log = logging.getLogger("mkdocs.hooks.generated")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _package():
    """The package of this checkout (not another installed copy)."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from allennlp_analyze import cli, records

    return cli, records


def _record_fields(markdown: str, page: str) -> str:
    _, records = _package()
    fields = records.RECORD_FIELDS
    listed = " ".join(f"`{name}`" for name in fields)
    documented = set()
    for row in re.findall(r"^\| `([^|]+)` \|", markdown, flags=re.M):
        documented.update(name.strip().strip("`") for name in row.split(","))
    missing = [f for f in fields if f not in documented]
    unknown = sorted(documented - set(fields) - {"field"})
    if missing:
        log.warning("%s: record fields without a row in the table: %s", page, ", ".join(missing))
    if unknown:
        log.warning("%s: the table documents fields the record lacks: %s", page, ", ".join(unknown))
    return markdown.replace("<!-- record-fields -->", listed)


def _cli_help(markdown: str) -> str:
    cli, _ = _package()
    os.environ["COLUMNS"] = "100"  # argparse wraps at the terminal's width: make it fixed
    text = cli.build_parser().format_help()
    return markdown.replace("<!-- cli-help -->", "```text\n" + text.rstrip() + "\n```")


def on_page_markdown(markdown, page, config, files):
    if "<!-- record-fields -->" in markdown:
        markdown = _record_fields(markdown, page.file.src_uri)
    if "<!-- cli-help -->" in markdown:
        markdown = _cli_help(markdown)
    return markdown
