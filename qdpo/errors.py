"""The one exception type a user mistake raises.

The CLI prints its message (no traceback unless --debug) and exits non-zero; library users can
catch it. Anything else escaping is a bug in qdpo.
"""

from __future__ import annotations

from typing import NoReturn


class QdpoError(Exception):
    """A problem the user can fix: the message names it and says how."""

    exit_code = 2


class RecipeError(QdpoError):
    """The recipe (YAML or an override) is invalid."""


class DataError(QdpoError):
    """The data cannot be read or holds no usable pair."""


class ModelError(QdpoError):
    """The model or adapter cannot be loaded."""


class RunDirError(QdpoError):
    """The run / output directory is not what the command expects."""


def listed(names: list[str], limit: int = 10) -> str:
    """Names for a message: 'a, b, c', or the first `limit` and how many more."""
    more = len(names) - limit
    return ", ".join(names[:limit]) + (f" and {more} more" if more > 0 else "")


def interrupted_while_starting() -> NoReturn:
    """Ctrl-C or SIGTERM before the CLI is ready (its imports, torch's): one line, and out at
    once. os._exit skips the interpreter's clean-up, which after an import cut in the middle
    could still end the process by the signal itself; nothing has been written yet."""
    import os
    import sys

    sys.stderr.write("error: interrupted while starting; nothing was done\n")
    sys.stderr.flush()
    os._exit(130)
