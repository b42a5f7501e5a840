"""The one schema every source is normalized to, and the errors that point at bad rows.

An :class:`Example` is what the prepare stage writes and every later stage reads.
Problems in raw data are collected as :class:`Problem` (file, line, field, message) and
raised together as one :class:`DataError`, so a user fixes a file in one pass instead
of one traceback at a time.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.errors import DataError

TASK_TYPES = ("classification", "short_answer", "free_text")


@dataclass(frozen=True)
class Example:
    """One instruction-following example, normalized.

    ``task`` names the task family (e.g. ``sentiment``); ``task_type`` picks the
    metrics (see ``TASK_TYPES``); ``source`` says where the row came from.
    ``messages`` holds a multi-turn conversation (``[{"role", "content"}]``, roles
    ``system``/``user``/``assistant``, ending with an assistant turn); for those,
    ``instruction`` is the first user turn and ``output`` the last assistant turn, so
    every single-turn consumer (dedup, metrics, references) still sees meaningful text.
    """

    id: str
    task: str
    task_type: str
    instruction: str
    input: str
    output: str
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, str]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The row as written to JSON: fields in order, ``meta``/``messages`` copied, not shared.

        Built field by field: ``dataclasses.asdict`` sends every string through ``copy.deepcopy``, which cost
        more than the rest of the prepare stage's writing at 100k rows.
        """
        row = {"id": self.id, "task": self.task, "task_type": self.task_type, "instruction": self.instruction,
               "input": self.input, "output": self.output, "source": self.source, "meta": _copy(self.meta)}
        if self.messages is not None:  # single-turn rows keep the original shape
            row["messages"] = _copy(self.messages)
        return row

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> "Example":
        return cls(**{k: row[k] for k in cls.__dataclass_fields__ if k in row})


def _copy(value: Any) -> Any:
    """A deep copy of JSON-like data (what ``asdict`` gives a field), leaving immutable leaves shared."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(v) for v in value)
    return value if isinstance(value, (str, int, float, bool, type(None))) else copy.deepcopy(value)


@dataclass(frozen=True)
class Problem:
    """One problem in raw data: where it is and what is wrong."""

    file: str
    line: int | None
    field: str | None
    message: str
    raw: Any = field(default=None, compare=False, repr=False)  # the offending row, for quarantine

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class ProblemCollector:
    """Collects problems until ``limit``, then raises them all.

    Usage::

        problems = ProblemCollector(limit=20)
        problems.add(Problem(...))   # raises DataError when a problem past the limit arrives
        problems.raise_if_any()      # at the end of a source: raises if any row was bad
        problems.stop()              # the file as a whole is unreadable: raises in any mode

    With ``skip=True`` (``data.on_error: skip``) bad rows are only recorded, without a
    limit: the caller writes them to a quarantine file and counts them, and only
    problems that make a whole file unreadable (:meth:`stop`) still raise.
    """

    def __init__(self, limit: int = 20, skip: bool = False):
        self.limit = limit
        self.skip = skip
        self.problems: list[Problem] = []

    def add(self, problem: Problem) -> None:
        if not self.skip and len(self.problems) >= self.limit:  # past the limit: report the first `limit`
            raise DataError(self.problems, truncated=True)
        self.problems.append(problem)

    def raise_if_any(self) -> None:
        if self.problems and not self.skip:
            raise DataError(self.problems)

    def stop(self) -> None:
        """Raise every problem so far when there is one, whatever the mode."""
        if self.problems:
            raise DataError(self.problems[-self.limit:])
