"""The command line an optimiser run records in its ``_optimiser.star`` (RELION's second comment line): this
process's arguments after ``cryopipe <job>``."""

from __future__ import annotations

import sys

__all__ = ["command_arguments"]


def command_arguments() -> list[str]:
    """``sys.argv[2:]`` (the job's options), or [] when the process was not started as ``cryopipe <job> …``."""
    return sys.argv[2:] if len(sys.argv) > 2 else []
