"""What crossgrad prints besides results: warnings, and progress bars only where someone watches them."""
from __future__ import annotations

import sys


def warn(message: str) -> None:
    """One warning line on stderr."""
    print(f"crossgrad: warning: {message}", file=sys.stderr, flush=True)


def bars_wanted() -> bool:
    """Whether progress bars belong in the output: both streams on a terminal. Redirected to a file or a pipe
    (`crossgrad quickstart > log`), a bar's carriage-return redraws would interleave with the log lines."""
    return all(stream is not None and stream.isatty() for stream in (sys.stdout, sys.stderr))
