"""Register the plugin with AllenNLP for every directory: add ``allennlp_analyze.plugin`` to the
global plugins file ``~/.allennlp/plugins``, which AllenNLP reads besides ``.allennlp_plugins`` in
the working directory.

    python -m allennlp_analyze.plugin.register          # then: allennlp analyze --help
    python -m allennlp_analyze.plugin.register --remove # undo

Idempotent; other plugins listed in the file are kept.
"""

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

PLUGIN = "allennlp_analyze.plugin"


def global_plugins_file() -> Path:
    """Where AllenNLP looks (``allennlp.common.plugins.GLOBAL_PLUGINS_FILENAME``), from the
    current ``$HOME``."""
    return Path.home() / ".allennlp" / "plugins"


def _read(path: Path) -> list:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []


def register(path: Optional[Path] = None) -> bool:
    """Add the plugin to ``path`` (default: the global plugins file); False if already there."""
    path = Path(path) if path else global_plugins_file()
    lines = _read(path)
    if PLUGIN in (line.strip() for line in lines):
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = [line for line in lines if line.strip()]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept + [PLUGIN]), encoding="utf-8")
    os.replace(tmp, path)
    return True


def unregister(path: Optional[Path] = None) -> bool:
    """Remove the plugin from ``path``; False if it was not there."""
    path = Path(path) if path else global_plugins_file()
    lines = _read(path)
    kept = [line for line in lines if line.strip() and line.strip() != PLUGIN]
    if len(kept) == len([line for line in lines if line.strip()]):
        return False
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m allennlp_analyze.plugin.register",
        description="Make `allennlp analyze` and the `weight_analysis` trainer callback "
        "available in every directory (adds the plugin to ~/.allennlp/plugins).",
    )
    parser.add_argument("--remove", action="store_true", help="unregister instead")
    parser.add_argument(
        "--plugins-file",
        type=Path,
        default=None,
        help="the plugins file to edit (default %s)" % global_plugins_file(),
    )
    args = parser.parse_args(argv)
    path = args.plugins_file or global_plugins_file()
    try:
        changed = unregister(path) if args.remove else register(path)
    except OSError as e:
        print(f"{parser.prog}: error: cannot update {path}: {e.strerror or e}", file=sys.stderr)
        return 2
    verb = (
        ("removed from" if changed else "was not in")
        if args.remove
        else ("added to" if changed else "already in")
    )
    print(f"{PLUGIN} {verb} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
