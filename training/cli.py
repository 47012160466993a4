"""Error reporting shared by the command-line entry points of training/ and benchmarks/."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

__all__ = ["run_cli"]

T = TypeVar("T")


def run_cli(prog: str, main: Callable[[], T]) -> T:
    """Run `main` and turn invalid input into a one-line error and a non-zero exit status.

    ValueError (invalid options, data or checkpoints, each message naming the value) exits
    with status 2. OSError (an output path that is a file, a folder without write permission,
    a full disk) exits with status 1. Other exceptions are program errors and keep their
    traceback. Under Python's development mode (`python -X dev`) the first two print their
    traceback too, for a ValueError that comes from a bug rather than from the input.
    """
    try:
        return main()
    except ValueError as error:
        _report(prog, error)
        raise SystemExit(2) from None
    except OSError as error:
        _report(prog, error)
        raise SystemExit(1) from None


def _report(prog: str, error: Exception) -> None:
    if sys.flags.dev_mode:
        traceback.print_exception(error)
    print(f"{prog}: error: {error}", file=sys.stderr)
