"""The Jinja environment every template renders in: the one transformers uses for chat templates."""

from __future__ import annotations

import functools

import jinja2
from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> "jinja2.Template":
    """Compile once per template text; rendering 100k examples must not re-parse it."""
    # The settings transformers uses for chat templates, so our rendering is identical;
    # StrictUndefined turns a misspelt variable into an error instead of empty text.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=StrictUndefined)

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)
