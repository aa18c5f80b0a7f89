"""User-facing errors.

Every problem caused by the user's input (a bad file, a missing column, an impossible option) is raised as
:class:`CryopipeError` with a one-line message that names the file / column / value and the remedy. The CLI
prints the message (no traceback) and exits with status 1.
"""

from __future__ import annotations


class CryopipeError(Exception):
    """An error in the user's input or environment, with a one-line explanation."""


class InputFileError(CryopipeError):
    """A file that cannot be read or does not have the content a job needs."""

    def __init__(self, path, problem: str, remedy: str | None = None):
        msg = f"{path}: {problem}"
        if remedy:
            msg += f" ({remedy})"
        super().__init__(msg)
        self.path = path
        self.problem = problem
        self.remedy = remedy
