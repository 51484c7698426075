"""User-facing errors.

Anything a user can fix (a bad path, a typo in a TOML key, a corrupt file) is raised as a
subclass of :class:`UserError`. The CLIs catch it and print exactly one line to stderr,
then exit with status 2 (see :func:`library.cli.run_main`). Programming errors are not
wrapped and keep their traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can act on: where it happened, what is wrong, what to do.

    ``where`` names the file, and/or key or line (``"my.toml: datasets[0].subsets[1]"``);
    ``hint`` says what to do. ``str(err)`` is the one line a CLI prints.
    """

    def __init__(self, message: str, where: str | None = None, hint: str | None = None):
        self.message = message
        self.where = where
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text = f"{text} ({self.hint})"
        return " ".join(text.split("\n"))


class ConfigError(UserError):
    """A bad TOML file, flag or option value."""


class DataError(UserError):
    """A bad image, caption, metadata or list file."""


class ModelError(UserError):
    """A checkpoint that cannot be read, is not SDXL, or does not match the expected keys."""
