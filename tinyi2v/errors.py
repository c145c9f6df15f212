"""The one exception family tinyi2v raises on bad files and bad requests.

Callers (the CLI, an app) catch `TinyI2VError` and show its message as one line; anything else
escaping is a bug.
"""


class TinyI2VError(Exception):
    """Base class: a problem the user can fix, with a message that says what and where."""


class FormatError(TinyI2VError, ValueError):
    """A weights file, checkpoint or model folder is malformed, unsafe or incompatible."""
