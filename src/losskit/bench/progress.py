"""The run's progress display: a tqdm bar on a terminal, else one log line per finished cell."""

from __future__ import annotations

import sys
from typing import Callable

__all__ = ["Progress"]


class Progress:
    """tqdm when installed, wanted and stderr is a terminal (a log file gets
    no carriage-return spam); otherwise one line per finished cell."""

    def __init__(self, total: int, enabled: bool, log: Callable[[str], None]):
        self.bar = None
        self.log = log
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                self.bar = None

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)

    def step(self, n: int = 1) -> None:
        if self.bar is not None and n > 0:
            self.bar.update(n)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            self.log(text)

    def cell_done(self, text: str) -> None:
        """A line per finished cell when there is no bar to show progress."""
        if self.bar is None and self.enabled:
            self.log(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
