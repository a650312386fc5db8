"""The one exception type for problems a user can cause (bad path, corrupt archive, bad option),
the escaping of text from the input (file names, URLs, tensor names) wherever it is printed, and
the squeezing of a library's error detail onto one line."""

import re
from typing import Any


class AnalyzeError(Exception):
    """A user-facing error. Its message is one line, written for the user; front-ends print it
    to stderr and exit with code 2, without a traceback."""


#: Characters that a name from the input must not print as themselves: C0/C1 controls (newlines,
#: ESC, ...), the line and paragraph separators, bidirectional overrides (which reorder what a
#: terminal shows) and lone surrogates (undecodable bytes of a file name, which a strict UTF-8
#: stream cannot even write).
_UNPRINTABLE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: "re.Match") -> str:
    c = match.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def escape(text: object) -> str:
    """``str(text)`` with every control, separator, bidi-override and surrogate character written
    as a backslash escape (``\\n``, ``\\x1b``, ``\\u202e``, ``\\udcff``): one line, and nothing a
    terminal would act on. Other characters (backslashes included) are kept as they are."""
    return _UNPRINTABLE.sub(_escaped, str(text))


def one_line(text: Any) -> str:
    """``text`` squeezed onto one line (error details from libraries may span several)."""
    return " ".join(str(text).split())
