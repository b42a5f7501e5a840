"""Every failure a user can fix by changing input, config or a file, in one place.

Each class derives from :class:`PipelineError`, which the entry-point guard
(:func:`pipeline.core.cli.guard`) turns into one ``<stage>: error: <message>`` line. They live below
every stage and library so that anything may raise them and the guard needs to import
nothing else.
"""

from __future__ import annotations

from typing import Any, Iterable


class PipelineError(Exception):
    """A failure with a message a user can act on: printed on one line, no traceback."""


class ConfigError(PipelineError, ValueError):
    """All problems found in one configuration, reported together."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) in {source}:\n" + "\n".join(f"  {p}" for p in problems))


class DataError(PipelineError, ValueError):
    """Every collected data problem (up to a limit), raised at once; each reads ``file:line: field: message``."""

    def __init__(self, problems: Iterable[Any], truncated: bool = False):
        self.problems = list(problems)
        self.truncated = truncated
        lines = [f"  {p}" for p in self.problems]
        more = "\n  ... (stopped after this many problems)" if truncated else ""
        super().__init__(f"{len(self.problems)} problem(s) in the raw data:\n" + "\n".join(lines) + more)


class SplitError(PipelineError, ValueError):
    """The data cannot be split into non-empty train and test sets."""


class SafetyListError(PipelineError, ValueError):
    """A rule list cannot be read or a regex does not compile (file and line named)."""


class PromptError(PipelineError, ValueError):
    """A template that cannot render an example; the message names the template and field."""


class LabelError(PipelineError, ValueError):
    """A val/test label the classifier could never predict, because train never shows it."""


class ModelError(PipelineError, RuntimeError):
    """A model or tokenizer could not be found, read or matched; the message says which."""


class TemplateMismatch(PipelineError, RuntimeError):
    """The evaluation prompts were rendered with another template than the model's."""


class SliceError(PipelineError, ValueError):
    """A declared slice names a field no test example has."""


class MissingInput(PipelineError, FileNotFoundError):
    """An input a stage needs (an earlier stage's output) is not there; the message says which stage makes it."""
