"""What every command gets (the DSN and verbosity), apart from the root command so that
command modules import it without importing the root (no cycle: main -> groups -> context)."""

from __future__ import annotations

import click


class Context:
    """What every command gets: the DSN (None = resolve later) and verbosity."""

    def __init__(self, dsn: str | None, verbose: bool):
        self.dsn = dsn
        self.verbose = verbose


pass_ctx = click.make_pass_decorator(Context)
