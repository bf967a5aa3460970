"""The `cryomamba` command's consoles (results to stdout, the rest to stderr) and usage error."""

from __future__ import annotations

import errno

from rich.console import Console

from .errors import ConfigError

__all__ = ["UI", "UsageError"]


class UsageError(ConfigError):
    """A command line that argparse rejects."""

    code = "usage"


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """Rich would exit with 1; let `main` end quietly instead (`_reader_gone`)."""
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, "the reader of the output went away")


class UI:
    """Where output goes: results to `out`, progress, logs and errors to `err`."""

    def __init__(self, quiet: bool = False) -> None:
        self.out = _Console(highlight=False)
        self.err = _Console(stderr=True, highlight=False)
        self.quiet = quiet

    def result(self, text: str) -> None:
        """A result line on stdout as it is (no markup, emoji codes or wrapping): tokens, JSON,
        paths that scripts read back."""
        self.out.print(text, soft_wrap=True, markup=False, emoji=False, highlight=False)
