"""`python -m qdpo` and the `qdpo` console script.

Start-up imports torch and the CLI with Ctrl-C and SIGTERM held back: a signal that lands
inside torch's C++ import code aborts the process ("terminate called after throwing an instance
of 'pybind11::error_already_set'"). Held, it arrives once the imports are done and ends the
command with one line.
"""

import contextlib
import signal
from typing import Iterator

_HELD = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)  # a held one is delivered now


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupted)  # until the CLI installs its own handlers
    try:
        with _signals_held():  # the heavy imports every command makes first
            import torch  # noqa: F401

            from qdpo import console  # noqa: F401  (rich)
            from qdpo.cli import main as cli_main
    except KeyboardInterrupt:
        from qdpo.errors import interrupted_while_starting

        interrupted_while_starting()
    cli_main()


if __name__ == "__main__":
    main()
