"""Prompt design, as pure string formatting: ``(example, template) -> (prompt, completion)``.

A :class:`Template` is either a chat template over ``messages`` (``kind: chat``: the
tokenizer's own, or one from ``conf/prompt/`` such as chatml) or a Jinja template of
``instruction``/``input`` (``kind: jinja``: alpaca, plain, a user's file). Its
:meth:`Template.hash` travels with the rendered data and the trained weights, so
evaluation can refuse prompts rendered differently from the ones the model was trained on.

:func:`segments` splits the full text into pieces the model reads and pieces it learns
(every assistant turn of a multi-turn conversation); :func:`render` is its single-answer
view. Jinja templates render single-turn examples only: a multi-turn conversation is
refused with a message naming ``prompt=chat``/``prompt=chatml``, because pasting turns
into an instruction template would invent a format no model was trained on.
Tokenization and masking are not done here (see the render stage).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from jinja2 import TemplateError

from pipeline.core.config import PromptConfig
from pipeline.core.errors import PromptError
from pipeline.prompting.chat_skeletons import render_chat
from pipeline.prompting.jinja import compile_template


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
    train_on: str = "all_assistant"  # all_assistant | last_assistant: labels, so part of the identity
    k_shot: int = 0
    shot_seed: int = 0

    def hash(self) -> str:
        """Content hash of the template: equal hashes render equal text."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "hash": self.hash()}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "Template":
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


def read_template_file(cfg: PromptConfig) -> PromptConfig:
    """The config with ``template`` replaced by the text of ``template_file`` (when set).

    Called by the render entry point: the file's text, not its path, is what the
    template hash covers, so editing the file invalidates everything rendered from it.
    """
    if not cfg.template_file:
        return cfg
    try:
        text = Path(cfg.template_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PromptError(f"prompt.template_file: cannot read {cfg.template_file}: {err}") from None
    return replace(cfg, template=text)


def make_template(cfg: PromptConfig, chat_template: str | None, bos_token: str | None, eos_token: str) -> Template:
    """Bind a prompt config to a tokenizer's chat template and special tokens.

    ``kind=chat`` uses ``cfg.template`` when it is set (e.g. chatml) and the tokenizer's
    chat template otherwise.
    """
    own = cfg.template if cfg.kind == "chat" else None
    if cfg.kind == "chat" and not (own or chat_template):
        raise PromptError(f"prompt={cfg.name}: kind=chat but the tokenizer has no chat template; "
                          "choose prompt=chatml, prompt=alpaca or prompt=plain")
    for source in (own, cfg.template if cfg.kind == "jinja" else None):
        if source:
            try:
                compile_template(source)
            except TemplateError as err:
                raise PromptError(f"prompt={cfg.name}: the template does not parse: {err}") from None
    return Template(
        name=cfg.name,
        kind=cfg.kind,
        system=cfg.system,
        template=cfg.template if cfg.kind == "jinja" else None,
        chat_template=(own or chat_template) if cfg.kind == "chat" else None,
        bos_token=bos_token or "",
        eos_token=eos_token,
        train_on=cfg.train_on,
        k_shot=cfg.k_shot,
        shot_seed=cfg.shot_seed,
    )


def user_message(example: Mapping[str, Any]) -> str:
    """The user turn: the instruction, then the input (if any) after a blank line."""
    return example["instruction"] + (f"\n\n{example['input']}" if example.get("input") else "")


Segment = tuple[str, bool]  # (text, learnt): learnt text is an assistant turn and gets labels


def segments(example: Mapping[str, Any], template: Template, shots: Sequence[Mapping[str, Any]] = ()) -> list[Segment]:
    """The full training text of one example, cut into read and learnt pieces, in order.

    Every assistant turn of the example is a learnt piece ending with the end-of-turn
    token (the caller may unlearn all but the last: ``train_on``); everything else,
    including the ``shots`` (exemplars, rendered as earlier turns or earlier prompts),
    is read only. ``"".join(text for text, _ in segments(...))`` is the training text.
    """
    try:
        if template.kind == "chat":
            return _chat_segments(example, template, shots)
        if example.get("messages"):
            raise PromptError(f"prompt={template.name}: example {example.get('id')!r} is a {len(example['messages'])}-"
                              "turn conversation, and Jinja instruction templates render single-turn examples "
                              "only; use prompt=chat or prompt=chatml for conversations")
        compiled = compile_template(template.template or "")
        prefix = "".join(_jinja_prompt(compiled, shot, template) + shot["output"] + "\n\n" for shot in shots)
        return [(prefix + _jinja_prompt(compiled, example, template), False),
                (example["output"] + template.eos_token, True)]
    except PromptError:
        raise
    except TemplateError as err:  # an undefined variable, a syntax error, raise_exception()
        raise PromptError(f"prompt={template.name}: cannot render example {example.get('id')!r}: {err}") from None


def render(example: Mapping[str, Any], template: Template, shots: Sequence[Mapping[str, Any]] = ()) -> tuple[str, str]:
    """Return ``(prompt, completion)`` for one example: the last answer, and all text before it.

    ``prompt + completion`` is the full training text; the completion ends with the
    end-of-turn token so the tuned model learns to stop.
    """
    pieces = segments(example, template, shots)
    return "".join(text for text, _ in pieces[:-1]), pieces[-1][0]


def _jinja_prompt(compiled: "Any", example: Mapping[str, Any], template: Template) -> str:
    return compiled.render(instruction=example["instruction"], input=example.get("input", ""),
                           system=template.system, task=example.get("task", ""))


def conversation(example: Mapping[str, Any], template: Template,
                 shots: Sequence[Mapping[str, Any]] = ()) -> tuple[list[dict[str, str]], int]:
    """The messages a chat template renders, and the index of the first turn that can be learnt."""
    turns = example.get("messages") or [{"role": "user", "content": user_message(example)},
                                        {"role": "assistant", "content": example["output"]}]
    system = [t for t in turns[:1] if t["role"] == "system"]  # the data's own system turn wins
    if not system and template.system:
        system = [{"role": "system", "content": template.system}]
    shown = [turn for shot in shots for turn in ({"role": "user", "content": user_message(shot)},
                                                  {"role": "assistant", "content": shot["output"]})]
    head = system + shown
    return head + [t for t in turns if t["role"] != "system"], len(head)


def _chat_segments(example: Mapping[str, Any], template: Template, shots: Sequence[Mapping[str, Any]]) -> list[Segment]:
    messages, first = conversation(example, template, shots)
    source = template.chat_template or ""
    special = (("bos_token", template.bos_token), ("eos_token", template.eos_token))
    out: list[Segment] = []
    done = ""  # the text covered by `out` so far
    for i in range(first, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        prompt = render_chat(source, messages[:i], True, special)
        full = render_chat(source, messages[:i + 1], False, special)
        if not (full.startswith(prompt) and prompt.startswith(done)):
            raise PromptError(f"prompt={template.name}: the chat template renders a conversation's start "
                              "differently once later turns are added, so turns cannot be masked exactly")
        # Keep everything up to the end-of-turn token; the newline after it belongs to the next turn.
        answer = full[len(prompt):].rstrip("\n")
        out += [(prompt[len(done):], False), (answer, True)]
        done = prompt + answer
    return out
