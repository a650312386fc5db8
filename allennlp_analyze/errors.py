"""The one exception type for problems a user can cause (bad path, corrupt archive, bad option)."""


class AnalyzeError(Exception):
    """A user-facing error. Its message is one line, written for the user; front-ends print it
    to stderr and exit with code 2, without a traceback."""
