"""Prompt design, as pure string formatting: ``(example, template) -> (prompt, completion)``.

A :class:`Template` is either the tokenizer's chat template (``kind: chat``) or a Jinja
template from ``conf/prompt/`` (``kind: jinja``). Its :meth:`Template.hash` travels with
the rendered data and the trained weights, so evaluation can refuse prompts rendered
differently from the ones the model was trained on. Tokenization and masking are not
done here (see the render stage).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import jinja2
from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pipeline.config import PromptConfig


class PromptError(ValueError):
    """A template that cannot render an example; the message names the template and field."""


@dataclass(frozen=True)
class Template:
    """Everything that decides the text a model sees."""

    name: str
    kind: str  # chat | jinja
    system: str | None
    template: str | None  # jinja source (kind=jinja)
    chat_template: str | None  # the tokenizer's chat template (kind=chat)
    bos_token: str
    eos_token: str

    def hash(self) -> str:
        """Content hash of the template: equal hashes render equal text."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "hash": self.hash()}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "Template":
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__})


def make_template(cfg: PromptConfig, chat_template: str | None, bos_token: str | None, eos_token: str) -> Template:
    """Bind a prompt config to a tokenizer's chat template and special tokens."""
    if cfg.kind == "chat" and not chat_template:
        raise PromptError(f"prompt={cfg.name}: kind=chat but the tokenizer has no chat template; "
                          "choose prompt=alpaca or prompt=plain")
    return Template(
        name=cfg.name,
        kind=cfg.kind,
        system=cfg.system,
        template=cfg.template if cfg.kind == "jinja" else None,
        chat_template=chat_template if cfg.kind == "chat" else None,
        bos_token=bos_token or "",
        eos_token=eos_token,
    )


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> "jinja2.Template":
    """Compile once per template text; rendering 100k examples must not re-parse it."""
    # The settings transformers uses for chat templates, so our rendering is identical;
    # StrictUndefined turns a misspelt variable into an error instead of empty text.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=StrictUndefined)

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def user_message(example: Mapping[str, Any]) -> str:
    """The user turn: the instruction, then the input (if any) after a blank line."""
    return example["instruction"] + (f"\n\n{example['input']}" if example.get("input") else "")


def render(example: Mapping[str, Any], template: Template) -> tuple[str, str]:
    """Return ``(prompt, completion)`` for one example.

    ``prompt + completion`` is the full training text; the completion ends with the
    end-of-turn token so the tuned model learns to stop.
    """
    try:
        if template.kind == "chat":
            messages = [{"role": "system", "content": template.system}] if template.system else []
            messages.append({"role": "user", "content": user_message(example)})
            compiled = _compile(template.chat_template or "")
            special = {"bos_token": template.bos_token, "eos_token": template.eos_token}
            prompt = compiled.render(messages=messages, add_generation_prompt=True, **special)
            full = compiled.render(
                messages=[*messages, {"role": "assistant", "content": example["output"]}],
                add_generation_prompt=False, **special,
            )
            if not full.startswith(prompt):
                raise PromptError(f"prompt={template.name}: the chat template renders the prompt differently "
                                  "with and without the answer, so prompt tokens cannot be masked exactly")
            # Keep everything up to the end-of-turn token; trailing newlines carry no signal.
            return prompt, full[len(prompt):].rstrip("\n")
        context = {"instruction": example["instruction"], "input": example.get("input", ""),
                   "system": template.system, "task": example.get("task", "")}
        prompt = _compile(template.template or "").render(**context)
        return prompt, example["output"] + template.eos_token
    except PromptError:
        raise
    except TemplateError as err:  # an undefined variable, a syntax error, raise_exception()
        raise PromptError(f"prompt={template.name}: cannot render example {example.get('id')!r}: {err}") from None
