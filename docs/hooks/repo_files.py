"""MkDocs hook: pages under docs/ link to files elsewhere in the repository as ``../path``
(so the links work when the Markdown is read on its own). Images there (the experiment's
figures) are copied into the site and their links rewritten; links to other repository files
(scripts, READMEs) become the file's path in code, since the site does not hold them."""

import os
import posixpath
import re

from mkdocs.structure.files import File

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGE = (".png", ".svg", ".jpg")
LINK = re.compile(r"(!?)\[([^\]]*)\]\((\.\./[^)#\s]+)\)")


def _outside(page_uri: str, target: str):
    """The repository path a ``../`` link from ``page_uri`` (relative to docs/) names, or None
    where it stays inside docs/ or does not exist."""
    path = posixpath.normpath(posixpath.join("docs", posixpath.dirname(page_uri), target))
    if path.startswith("docs/") or path.startswith(".."):
        return None
    return path if os.path.isfile(os.path.join(REPO, path)) else None


def on_files(files, config):
    for root, _, names in os.walk(os.path.join(REPO, "examples")):
        for name in names:
            if name.endswith(IMAGE):
                rel = os.path.relpath(os.path.join(root, name), REPO).replace(os.sep, "/")
                files.append(File.generated(config, rel, abs_src_path=os.path.join(REPO, rel)))
    return files


def on_page_markdown(markdown, page, config, files):
    uri = page.file.src_uri

    def rewrite(m):
        bang, text, target = m.groups()
        path = _outside(uri, target)
        if path is None:
            return m.group(0)
        if bang and path.endswith(IMAGE):
            return f"![{text}]({posixpath.relpath(path, posixpath.dirname(uri) or '.')})"
        return f"{text} (`{path}`)"

    return LINK.sub(rewrite, markdown)
