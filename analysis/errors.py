"""Error and warning types shared by the analysis modules.

Bad input (a missing path, an unknown column, an empty table) is an `AnalysisInputError`: the CLI turns it into a
one-line message and exit code 2. Problems that should not stop an analysis (a corrupt result file, a model with no
full-length baseline, a fit that cannot be made) are `AnalysisWarning`s: the analysis goes on and the report lists
them.
"""

from __future__ import annotations

from pathlib import Path


class AnalysisInputError(ValueError):
    """Input the analysis cannot use at all. The message names the file and the field; ``field`` keeps the latter."""

    def __init__(self, source: str | Path, message: str, field: str | None = None) -> None:
        self.source = str(source)
        self.field = field
        self.message = message
        super().__init__(f"{self.source}: {message}")


class AnalysisWarning(UserWarning):
    """Something the analysis skipped or could not compute; the run goes on."""
