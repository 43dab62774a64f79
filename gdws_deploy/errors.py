"""The one user-facing error class: the CLI turns it into one line and exit code 2."""


class GdwsError(Exception):
    """A problem the user can act on (bad file, bad flag, impossible target)."""
