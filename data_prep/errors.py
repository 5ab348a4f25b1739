"""The one error type of data preparation: it names the case, the file and the problem."""

from __future__ import annotations


class DataPrepError(ValueError):
    """Bad input found while preparing a dataset.

    The message always reads ``<where>: <problem>`` so a person knows which case (and which
    file) to fix; ``case`` and ``path`` keep the parts for callers that collect errors.
    """

    def __init__(self, problem: str, *, case: str | None = None, path: str | None = None):
        self.problem = problem
        self.case = case
        self.path = path
        where = []
        if case:
            where.append(f"case '{case}'")
        if path:
            where.append(f"({path})")
        prefix = " ".join(where)
        super().__init__(f"{prefix}: {problem}" if prefix else problem)
