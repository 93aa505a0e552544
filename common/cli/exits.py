"""Exit statuses of the front ends: 0 done, 1 the run failed (e.g. a non-finite metric, recorded in results.json),
2 bad input (a flag, a file, a directory: one line on stderr, before long work wherever it can be found),
130 interrupted (Ctrl-C: one line saying what was kept and how to continue).

Inside the library an error is `SystemExit("error: ...")` (its text is the message, as argparse-free callers and
the tests see it); `run_main` is what a script's `__main__` calls: it prints that line and exits with the
exception's `status` (2 unless it is a `RunFailed`).
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

__all__ = ["EXIT_FAILED", "EXIT_INPUT", "EXIT_INTERRUPTED", "RunFailed", "one_line_errors", "run_main"]

EXIT_FAILED, EXIT_INPUT, EXIT_INTERRUPTED = 1, 2, 130


class RunFailed(SystemExit):
    """The run itself failed (its inputs were fine as far as could be checked): exit status 1."""

    status = EXIT_FAILED


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextmanager
def one_line_errors(errors: tuple[type[BaseException], ...], interrupted: Callable[[], str]) -> Iterator[None]:
    """The block's `errors` become `SystemExit("error: <first line>")`; Ctrl-C prints
    "interrupted: <interrupted()>" on stderr and exits with status 130."""
    try:
        yield
    except errors as e:
        raise SystemExit(f"error: {_first_line(e)}") from None
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted()}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None


def run_main(main: Callable[[], object]) -> None:
    """Call a front end's main() as a command: an error message is printed on stderr (one line) and the process
    exits with status 2 (input) or 1 (`RunFailed`); a Ctrl-C outside the run exits with 130."""
    try:
        main()
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr, flush=True)
            sys.exit(getattr(e, "status", EXIT_INPUT))
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
