"""Shared command-line plumbing: one-line errors and exit codes."""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from library.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


# Warnings other packages print on import that say nothing about the user's run.
_NOISY_LOGGERS = (
    "bitsandbytes.backends.cpu.ops",  # "Failed to load CPU gemm_4bit_forward ..." on every CPU import
)


def quiet_third_party_noise() -> None:
    import logging

    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; a :class:`UserError` becomes one line on stderr and exit status 2.

    Use as ``if __name__ == "__main__": sys.exit(run_main(main))``.
    """
    prog = sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "sdxl"
    quiet_third_party_noise()
    try:
        code = main(argv)
    except UserError as err:
        print(f"{prog}: error: {err.one_line()}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return int(code or 0)
