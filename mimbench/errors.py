"""Errors caused by what the user gave us (paths, configs, checkpoints).

Everything the user can fix raises :class:`MimbenchError`; the CLI prints it as one
paragraph (what was wrong, then what to do) and exits with status 2 instead of a
stack trace from deep inside a loader.
"""
from __future__ import annotations


class MimbenchError(Exception):
    """A user-fixable problem: ``problem`` says what was wrong, ``fix`` what to do."""

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem.strip()
        self.fix = fix.strip()
        super().__init__(self.problem + ("\n" + self.fix if self.fix else ""))

    def __reduce__(self):
        # rebuilt from its two parts when it crosses a process boundary (a pipeline step run in a worker)
        return type(self), (self.problem, self.fix)
